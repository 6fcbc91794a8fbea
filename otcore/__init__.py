"""otcore: GPU optimal transport for PyTorch.

Public API (see README.md and docs/api.md):

- geometries: :class:`PointCloud`, :class:`CostMatrix`
- solvers: :func:`sinkhorn`, :func:`sinkhorn_newton`, :func:`sparse_ot`
- results: :class:`OTResult`, :class:`SparseOTResult`
- layers: :class:`SinkhornLoss`, :class:`SparseOTRouter`
"""

from .geometry import CostMatrix, PointCloud
from .nn import SinkhornLoss, SparseOTRouter
from .result import ConvergenceWarning, OTResult, SparseOTResult
from .solvers.newton import sinkhorn_newton
from .solvers.sinkhorn import sinkhorn
from .solvers.sparse import sparse_ot

__version__ = "0.1.0"

__all__ = [
    "PointCloud",
    "CostMatrix",
    "sinkhorn",
    "sinkhorn_newton",
    "sparse_ot",
    "OTResult",
    "SparseOTResult",
    "SinkhornLoss",
    "SparseOTRouter",
    "ConvergenceWarning",
]
