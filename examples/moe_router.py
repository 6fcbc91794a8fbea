"""Train a small mixture of experts on a toy task with two routers and compare them (CPU, < 1 min).

Task: inputs come from ``E`` Gaussian clusters; cluster ``c`` maps ``x`` to
``tanh(A_c x)``. A MoE with ``E`` small MLP experts can solve it exactly if its
router sends each cluster to one expert. Two routers score tokens with the same
linear gate:

- ``softmax-top1``: Switch-style token choice (the top expert's softmax probability as
  the weight) plus the usual load-balancing auxiliary loss ``E * sum_e f_e P_e``;
  no capacity limit here, so overloaded experts are not dropped, only discouraged.
- ``ot-capacity``: :class:`otcore.SparseOTRouter` in expert-choice mode: each expert
  takes at most ``ceil(1.25 * T / E)`` tokens and receives exactly ``T / E`` token
  mass; the combine weights are the plan entries, differentiable w.r.t. the gate.

Run: ``python examples/moe_router.py`` (options: --steps, --tokens, --experts, --seed).
Prints the test loss, how evenly tokens spread over experts and the time per step.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import otcore


def make_task(n_experts: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(n_experts, dim, generator=g)
    maps = torch.randn(n_experts, dim, dim, generator=g) / math.sqrt(dim)

    def sample(n: int, gen: torch.Generator):
        c = torch.randint(0, n_experts, (n,), generator=gen)
        x = centers[c] + torch.randn(n, dim, generator=gen)
        y = torch.tanh(torch.einsum("nij,nj->ni", maps[c], x))
        return x, y

    return sample


class MoE(nn.Module):
    """``E`` two-layer MLP experts behind a linear gate; ``router`` is "softmax-top1" or "ot-capacity"."""

    def __init__(self, dim: int, n_experts: int, router: str, hidden: int = 32):
        super().__init__()
        self.gate = nn.Linear(dim, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)) for _ in range(n_experts)
        )
        self.kind = router
        self.n_experts = n_experts
        if router == "ot-capacity":
            self.router = otcore.SparseOTRouter(n_experts, capacity_factor=1.25, gamma=0.1, max_iter=50,
                                                warm_start=True, plan_grad="implicit", backend="torch")

    def forward(self, x: torch.Tensor):
        """Returns the output and ``(aux_loss, tokens_per_expert)``."""
        scores = self.gate(x)
        out = torch.zeros_like(x)
        if self.kind == "softmax-top1":
            probs = scores.softmax(-1)
            top_p, top_e = probs.max(-1)
            counts = torch.bincount(top_e, minlength=self.n_experts).to(x.dtype)
            for e, expert in enumerate(self.experts):
                sel = (top_e == e).nonzero().flatten()
                if len(sel):
                    out.index_add_(0, sel, expert(x[sel]) * top_p[sel, None])
            frac = counts / len(x)
            aux = self.n_experts * (frac * probs.mean(0)).sum()
            return out, (aux, counts)
        r = self.router(scores)
        counts = r.dispatch_mask.sum(-1).to(x.dtype)
        for e, expert in enumerate(self.experts):
            sel = r.dispatch_index[e][r.dispatch_mask[e]]
            w = r.combine_weights[e][r.dispatch_mask[e]]
            out.index_add_(0, sel, expert(x[sel]) * w[:, None])
        return out, (torch.zeros((), dtype=x.dtype), counts)


def train(kind: str, args) -> dict:
    torch.manual_seed(args.seed)
    sample = make_task(args.experts, args.dim, args.seed)
    model = MoE(args.dim, args.experts, kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = sample(args.tokens, gen)
        pred, (aux, _) = model(x)
        loss = ((pred - y) ** 2).mean() + 0.01 * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.perf_counter() - start) / args.steps
    with torch.no_grad():
        x, y = sample(4096, torch.Generator().manual_seed(args.seed + 2))
        pred, (_, counts) = model(x)
        test = float(((pred - y) ** 2).mean())
        base = float((y**2).mean())
    return {"router": kind, "test_mse": test, "mse_of_zero": base, "max_load": float(counts.max() / counts.mean()),
            "step_ms": 1e3 * per_step}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag in ("steps", "tokens", "experts", "dim"):  # sizes: at least one of each
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(1)
    rows = [train(kind, args) for kind in ("softmax-top1", "ot-capacity")]
    print(f"{'router':14s} {'test MSE':>9s} {'MSE(0)':>7s} {'max/mean load':>14s} {'ms/step':>8s}")
    for r in rows:
        print(f"{r['router']:14s} {r['test_mse']:9.4f} {r['mse_of_zero']:7.4f} {r['max_load']:14.2f} {r['step_ms']:8.1f}")
    return rows


if __name__ == "__main__":
    main()
