"""Backend selection: which implementation of a geometry primitive runs.

``"torch"`` runs the pure-torch twins (:mod:`otcore.reference` for the dense-plan
primitives, :mod:`otcore.reference_sparse` for the ELL plan rows of Newton,
:mod:`otcore.reference_ksparse` for the k-sparse plans); ``"triton"`` runs the Triton kernels
through :mod:`otcore.triton_ops` (on CPU tensors that needs the Triton
interpreter, ``TRITON_INTERPRET=1`` set before Triton is imported);
``"auto"`` picks Triton for CUDA tensors when it is importable, torch otherwise.
A primitive without a Triton implementation falls back to the torch one.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from . import reference, reference_ksparse, reference_sparse

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def resolve(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend and check that it can run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on CPU tensors runs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA (and CPU via the interpreter), not {device.type}")
    return backend


def primitive(name: str, backend: str):
    """The implementation of primitive ``name`` for a resolved ``backend``."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton' for a geometry primitive (resolved, not 'auto'), "
                         f"got {backend!r}")
    if backend == "triton":
        from . import triton_ops as ops  # an import statement (not importlib) so torch.compile traces through
        fn = getattr(ops, name, None)
        if fn is not None:
            return fn
    for twins in (reference, reference_sparse, reference_ksparse):
        fn = getattr(twins, name, None)
        if fn is not None:
            return fn
    raise AttributeError(f"no geometry primitive named {name!r}")
