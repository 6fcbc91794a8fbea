"""Progress line for long solves: on a terminal after about a second, or when asked."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """Prints ``label iter N | marginal error E | eps e`` on one refreshed stderr line.

    ``verbose=None`` (default): only when stderr is a terminal and the run has
    lasted more than ``after`` seconds. ``True``: always. ``False``: never.
    """

    def __init__(self, verbose: Optional[bool], label: str, after: float = 1.0):
        self.label = label
        if verbose is not None and not isinstance(verbose, bool):
            raise TypeError(f"verbose must be True, False or None, got {verbose!r}")
        self.enabled = bool(verbose) if verbose is not None else sys.stderr.isatty()
        self.after = 0.0 if verbose else after
        self.start = time.perf_counter()
        self.last = 0.0
        self.printed = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def due(self) -> bool:
        """Whether :meth:`update` would print now: callers read the values it prints (a
        host sync on a GPU) only then."""
        if not self.enabled:
            return False
        now = self.elapsed
        return now >= self.after and now - self.last >= 0.25

    def update(self, it: int, err: float, eps: float, stage: str = "") -> None:
        if not self.due():
            return
        now = self.elapsed
        self.last = now
        self.printed = True
        extra = f" | {stage}" if stage else ""
        sys.stderr.write(f"\r{self.label} iter {it:6d} | marginal error {err:.3e} | eps {eps:.3g}{extra} | {now:6.1f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.printed:
            sys.stderr.write("\n")
            sys.stderr.flush()
