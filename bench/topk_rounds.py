"""Selection rounds per column tile of ``plan_topk``'s kernel, counted on any machine.

The kernel (``kernels/plan.py``, ``plan_topk_kernel``) runs, per tile of ``BLOCK_I`` rows x
``BLOCK_J`` columns, as many rounds (each an argmax over the tile) as the most keys of one
of its rows that beat that row's smallest kept slot, at most ``k``. This replays that
count in torch on a cloud problem with near-optimal potentials (a Sinkhorn solve), tile by
tile in the kernel's column order, with the launcher's tile sizes
(``softmin.block_sizes``): the work the kernel does, against the ``k`` rounds per tile it
ran before 2026-12-01.

    python bench/topk_rounds.py                      # 4096 x 4096, d = 3, k = 8 and 32
    python bench/topk_rounds.py --n 16384 --k 8
"""

from __future__ import annotations

import argparse

import torch

import otcore
from otcore.kernels import softmin


def rounds_per_tile(key: torch.Tensor, k: int, block_i: int, block_j: int) -> torch.Tensor:
    """Rounds of every column tile (averaged over the row tiles) for ranking keys (n, m)."""
    n, m = key.shape
    top = torch.full((n, k), -torch.inf, dtype=key.dtype)
    out = []
    for j0 in range(0, m, block_j):
        tile = key[:, j0:j0 + block_j]
        beat = (tile > top.amin(1, keepdim=True)).sum(1).clamp(max=k)
        rows = torch.nn.functional.pad(beat, (0, -n % block_i)).reshape(-1, block_i)
        out.append(rows.amax(1).double().mean())
        top = torch.cat([top, tile], 1).topk(k, dim=1).values
    return torch.stack(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=3)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--k", type=int, nargs="+", default=[8, 32])
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, args.d, generator=g)
    y = 0.05 + 0.9 * torch.rand(args.n, args.d, generator=g)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=args.eps, tol=1e-3)
    key = res.g.double()[None, :] - torch.cdist(x.double(), y.double()) ** 2  # a row's order of P
    bi, bj, _ = softmin.block_sizes(args.n, args.n, softmin.COST_DIRECT, args.d)
    print(f"# {args.n} x {args.n} cloud, d = {args.d}, eps = {args.eps}, {bi} x {bj} tiles")
    for k in args.k:
        r = rounds_per_tile(key, k, bi, bj)
        print(f"k = {k:3d}: {float(r.mean()):.2f} rounds per tile on average (was {k}); first tiles "
              f"{[round(float(v), 1) for v in r[:4]]}, last {float(r[-1]):.2f}")


if __name__ == "__main__":
    main()
