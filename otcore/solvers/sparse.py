"""PLACEHOLDER (being written): sparsity-constrained OT solver."""


def sparse_ot(*args, **kwargs):
    raise NotImplementedError("sparse_ot is being written")
