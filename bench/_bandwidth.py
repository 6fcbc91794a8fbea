"""Copy bandwidth of the device: the denominator of the benches' memory-bound floors.

A floor "one read of C at copy bandwidth" needs the bandwidth of *this* device, not the
H100's 2.9e12 B/s of the targets (docs/benchmarks.md) (an H200's HBM3e is faster). :func:`copy_bandwidth`
returns, in order of preference:

1. ``$OTCORE_COPY_BPS`` (bytes/s), which ``bench/gpu_check.sh`` sets from its ``env``
   part's measurement, so every part uses the same number;
2. on CUDA, a measurement now: a 1 GiB device-to-device copy (less when memory is
   short), timed with CUDA events, median of 10 after a warm-up;
3. without CUDA, the targets' H100 value (the CPU runs only check the plumbing).

Copy bandwidth is counted as bytes read + bytes written per second, as ``env`` counts
it: a kernel that only reads ``N`` bytes runs at the copy bandwidth when it takes
``N / copy_bandwidth`` seconds.
"""

from __future__ import annotations

import os
import statistics

import torch

ENV_VAR = "OTCORE_COPY_BPS"
H100_COPY_BPS = 2.9e12  # the targets' measured H100 copy bandwidth (docs/benchmarks.md)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2**30, reps: int = 10) -> float:
    """Bytes read + written per second of ``dst.copy_(src)`` for ``nbytes``-byte float32
    tensors on the CUDA ``device`` (halved until both fit in half the free memory)."""
    free = torch.cuda.mem_get_info(device)[0]
    while nbytes > 2**20 and 2 * nbytes > 0.5 * free:
        nbytes //= 2
    src = torch.empty(nbytes // 4, device=device)
    src.uniform_()  # never time a copy of zeros
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(runs)


def copy_bandwidth(device) -> tuple[float, str]:
    """``(bytes per second, where the number comes from)`` for ``device``."""
    device = torch.device(device)
    text = os.environ.get(ENV_VAR, "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if value > 0:
            return value, f"${ENV_VAR} (gpu_check.sh env part's 1 GiB copy)"
        print(f"note: ignoring ${ENV_VAR}={text!r} (not a positive number of bytes/s)", flush=True)
    if device.type == "cuda":
        return measure_copy_bandwidth(device), "measured now (device-to-device copy, CUDA events)"
    return H100_COPY_BPS, "the targets' H100 value (no CUDA device to measure)"


def describe(bps: float, source: str) -> str:
    return f"copy bandwidth {bps / 1e12:.3g} TB/s (read + written), {source}"
