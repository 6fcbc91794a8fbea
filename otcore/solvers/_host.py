"""Moving per-problem numbers between the device and the host, for the solvers whose
per-problem tests (line searches, stopping rules) run on the host: L-BFGS (sparse OT) and
SNS's Newton loop.

On a GPU every (B,)-sized tensor operation is a kernel launch costing the host
microseconds; a line search's few dozen tests cost more than reading the numbers they
need once per trial, which the loop must do anyway to decide whether to go on. Every
read and copy of these solvers goes through here (``bench/lbfgs_op_count.py`` counts them).
"""

from __future__ import annotations

import numpy as np
import torch


def to_host(*rows: torch.Tensor) -> np.ndarray:
    """``(len(rows), B)`` float64 on the host from ``(B,)`` tensors: one transfer (a
    synchronisation on a GPU)."""
    dt = rows[0].dtype if rows[0].is_floating_point() else torch.float64
    return host_array(torch.stack([r.to(dt) for r in rows])).astype(np.float64)


def host_array(t: torch.Tensor) -> np.ndarray:
    """``t``'s values as a host array (one transfer; a sync on a GPU)."""
    t = t.detach().cpu()
    try:
        return t.numpy()
    except RuntimeError:  # a tensor a torch.func transform wraps (OT under no_grad inside one) has no
        return np.asarray(t.tolist())  # storage numpy can see; its values it has


def to_device(x: np.ndarray, device) -> torch.Tensor:
    """A host array (a mask, steps, per-problem settings) on ``device``. Issued right after
    a host read, when the device's queue is empty, so a blocking copy waits for nothing
    but itself."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)
