"""Set-up shared by the Triton kernel test files (imported by them as a module).

Tensors live on ``DEVICE``: with CUDA the real kernels run, without it the Triton
interpreter (``TRITON_INTERPRET=1``, set here and in ``conftest.py`` before Triton is
first imported). Triton is a dependency on Linux, so there a broken install fails
the import instead of skipping the tests; elsewhere the kernel tests are skipped.
"""

import os
import platform

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if platform.system() == "Linux":
    import triton  # noqa: F401  (imported for its side effect: fail loudly if broken)
else:
    pytest.importorskip("triton", reason="triton is a dependency on Linux only (pyproject.toml)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: The interpreter computes tl.dot in full fp32 whatever its input_precision.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

#: ``pytestmark`` of the kernel files: NaN or inf arithmetic in the interpreter (even
#: in masked lanes) is an error.
RUNTIME_WARNINGS_ARE_ERRORS = pytest.mark.filterwarnings("error::RuntimeWarning")


def spy_launches(monkeypatch, kernels, grids=None) -> list:
    """Replace each ``(module, name)`` Triton kernel by a spy that records ``name`` at every
    launch (and its grid into ``grids``, if given), then launches it; returns the list of
    names (in launch order)."""
    seen = []
    for mod, name in kernels:
        kernel = getattr(mod, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                seen.append(name)
                if grids is not None:
                    grids.append(grid)
                return kernel[grid]

        monkeypatch.setattr(mod, name, Spy())
    return seen
