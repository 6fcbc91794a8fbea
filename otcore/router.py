"""PLACEHOLDER (being written): SparseOTRouter."""


class SparseOTRouter:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("SparseOTRouter is being written")
