"""PLACEHOLDER (being written): Sinkhorn-Newton-Sparse solver."""


def sinkhorn_newton(*args, **kwargs):
    raise NotImplementedError("sinkhorn_newton is being written")
