"""``sinkhorn(..., cuda_graph=True)``: blocks of iterations replayed from CUDA graphs.

On the CPU the recording is emulated (a "graph" that re-runs the block on its static
buffers at each replay), which checks the solver's side of the contract: static
inputs refilled before every replay, outputs copied out, one recording per block
length, per-problem freezing, iteration counts. The real recording runs where CUDA is.
"""

import pytest
import torch

import otcore
from otcore.solvers import _graph
from otcore.solvers import sinkhorn as sinkhorn_module

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class EmulatedGraphs:
    """Stands in for :func:`otcore.solvers._graph.capture_cuda` on the CPU."""

    def __init__(self):
        self.recorded = []  # block lengths recorded
        self.replays = 0

    def capture(self, block, f, g, active, k):
        self.recorded.append(k)
        first = block(f, g, active, k)  # the warm-up: this call's result
        out = tuple(torch.full_like(t, float("nan")) for t in first)  # recording runs nothing

        def replay():  # a graph re-reads its static inputs and rewrites its outputs
            self.replays += 1
            for static, new in zip(out, block(f, g, active, k)):
                static.copy_(new)

        return replay, out, first


@pytest.fixture
def emulated(monkeypatch):
    graphs = EmulatedGraphs()
    monkeypatch.setattr(sinkhorn_module, "graphed", lambda block, device, k: _graph.GraphedBlock(block, k, graphs.capture))
    return graphs


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rho,check_every", [(None, 10), (0.5, 4), ((None, 0.3), 7)])
def test_replayed_blocks_equal_eager_iterations(emulated, symmetric, rho, check_every):
    x = rand(3, 30, 2, seed=1)
    x[1] *= 3  # the problems converge after different numbers of iterations
    y = x if symmetric else rand(3, 41, 2, seed=2)
    kw = dict(eps=0.02, rho=rho, tol=1e-9, max_iter=2000, check_every=check_every, eps_schedule="geometric",
              backend="torch", overrelax=False)  # (plain: the problems stop apart; relaxed: test_overrelax.py)
    want = otcore.sinkhorn(otcore.PointCloud(x, y), **kw)
    got = otcore.sinkhorn(otcore.PointCloud(x, y), cuda_graph=True, **kw)
    assert bool(want.converged.all())
    assert torch.equal(got.n_iter, want.n_iter) and len(set(want.n_iter.tolist())) > 1
    assert torch.equal(got.f, want.f) and torch.equal(got.g, want.g)
    assert torch.equal(got.converged, want.converged)
    # the steady-state block (between two checks) is recorded once (its warm-up is that
    # call's result) and replayed after; the first block and the last one run eagerly
    assert emulated.recorded == ([check_every - 1] if check_every - 1 >= 2 else [])
    assert emulated.replays >= (1 if check_every - 1 >= 2 else 0)


def test_blocks_are_cut_at_max_iter(emulated):
    x, y = rand(20, 2, seed=3), rand(25, 2, seed=4)
    kw = dict(eps=1e-3, tol=1e-12, max_iter=26, check_every=10, backend="torch")
    with pytest.warns(otcore.ConvergenceWarning):
        want = otcore.sinkhorn(otcore.PointCloud(x, y), **kw)
    with pytest.warns(otcore.ConvergenceWarning):
        got = otcore.sinkhorn(otcore.PointCloud(x, y), cuda_graph=True, **kw)
    assert got.n_iter == want.n_iter == 26
    assert torch.equal(got.f, want.f)
    assert emulated.recorded == [9]  # the last block (iterations 21..25, cut at max_iter) ran eagerly


def test_recording_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(block, f, g, active, k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sinkhorn_module, "graphed", lambda block, device, k: _graph.GraphedBlock(block, k, broken))
    x, y = rand(20, 2, seed=5), rand(25, 2, seed=6)
    want = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.05, backend="torch")
    with pytest.warns(RuntimeWarning, match="recording the Sinkhorn iterations failed"):
        got = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.05, cuda_graph=True, backend="torch")
    assert got.n_iter == want.n_iter and torch.equal(got.f, want.f)


def test_no_effect_on_cpu_tensors_and_bad_type():
    x, y = rand(20, 2, seed=7), rand(25, 2, seed=8)
    want = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.05, backend="torch")
    got = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.05, cuda_graph=True, backend="torch")
    assert torch.equal(got.f, want.f)
    assert _graph.graphed(len, torch.device("cpu"), 9) is len
    with pytest.raises(TypeError, match="cuda_graph"):
        otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.05, cuda_graph=1)
    with pytest.raises(TypeError, match="cuda_graph"):
        otcore.SinkhornLoss(eps=0.05, cuda_graph="yes")(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records real CUDA graphs")
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed capture falls back to eager with a warning
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_real_cuda_graphs_equal_eager(backend):
    x = rand(64, 300, 3, seed=9, dtype=torch.float32).cuda()
    y = rand(64, 280, 3, seed=10, dtype=torch.float32).cuda()
    kw = dict(eps=0.05, tol=1e-5, backend=backend)
    want = otcore.sinkhorn(otcore.PointCloud(x, y), **kw)
    got = otcore.sinkhorn(otcore.PointCloud(x, y), cuda_graph=True, **kw)
    assert torch.equal(got.n_iter, want.n_iter)
    torch.testing.assert_close(got.f, want.f, rtol=0, atol=1e-6)
    assert bool(got.converged.all())
