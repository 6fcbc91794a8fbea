"""Blocks of Sinkhorn iterations replayed from CUDA graphs.

Small problems (a few thousand points, or large batches of tiny ones) are bound by
launch latency, not by the GPU: an iteration is ~10 kernel launches of a few
microseconds of work each, and the Python that issues them costs more than the
kernels. Between two convergence checks the iterations need no host decision, so
the solver hands each such block to :class:`GraphedBlock`, which records the
steady-state block (``check_every - 1`` iterations) into a CUDA graph once per solve and
then replays it: one launch per block.

A graph reads and writes fixed addresses, so each recorded block owns static input
buffers (``f``, ``g`` and the per-problem ``active`` mask) that are filled before a
replay, and static outputs that are copied out after it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from ..result import user_stacklevel

#: ``block(f, g, active, k) -> (f, g, ...)``: ``k`` iterations, potentials frozen where
#: ``active`` is False (the solver's block also returns the residual of its convergence
#: test). Must be functional (new output tensors, inputs untouched).
Block = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple]


def capture_cuda(block: Block, f, g, active, k: int):
    """Record ``block(f, g, active, k)`` into a CUDA graph; returns ``(replay, outputs,
    first)``, ``first`` being this call's result.

    The block first runs once, eagerly, on a side stream (torch asks for that warm-up
    there): it compiles and caches the kernels and their constants, since nothing may be
    compiled, allocated on the host or synchronised while a graph is recorded. It runs
    the same ``k``, because Triton compiles a separate variant for an integer argument
    equal to 1 or divisible by 16: a shorter warm-up could leave the recorded variant to
    be compiled inside the recording (which then fails). Its result is this call's, so
    the warm-up costs nothing; recording itself runs no kernel.
    """
    device = f.device
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        first = block(f, g, active, k)
    current.wait_stream(side)
    for t in first:  # made on the side stream, read on this one
        t.record_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(f, g, active, k)
    return graph.replay, out, first


class GraphedBlock:
    """``block`` replayed from one recorded graph when called with the length ``k``
    given here (the steady-state block between two checks); other lengths (the first
    blocks, the one cut at ``max_iter``) run eagerly, so a solve records one graph.

    ``capture(block, f, g, active, k) -> (replay, outputs, first)`` records one block
    on static inputs ``f, g, active`` and returns this call's result as ``first``;
    :func:`capture_cuda` on the GPU (tests pass an emulation). If recording fails, the
    block runs eagerly from then on, with a warning.
    """

    def __init__(self, block: Block, k: int, capture=capture_cuda):
        self.block, self.k, self.capture = block, k, capture
        self.recorded: Optional[tuple] = None
        self.failed = False

    def __call__(self, f, g, active, k: int):
        if self.failed or k != self.k or k < 2:
            return self.block(f, g, active, k)
        if self.recorded is None:
            static = (f.clone(), g.clone(), active.clone())
            try:
                replay, out, first = self.capture(self.block, *static, k)
            except Exception as e:  # an op that cannot be recorded (torch or Triton): run eagerly
                self.failed = True
                warnings.warn(f"cuda_graph: recording the Sinkhorn iterations failed ({e}); running them eagerly",
                              RuntimeWarning, stacklevel=user_stacklevel())
                return self.block(f, g, active, k)
            self.recorded = (replay, static, out)
            return tuple(first)
        replay, (sf, sg, sa), out = self.recorded
        sf.copy_(f)
        sg.copy_(g)
        sa.copy_(active)
        replay()
        return tuple(o.clone() for o in out)


def graphed(block: Block, device: torch.device, k: int):
    """``block`` of length ``k`` replayed from a CUDA graph on a CUDA device; unchanged elsewhere."""
    return GraphedBlock(block, k) if device.type == "cuda" else block
