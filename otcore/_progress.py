"""Progress line for long solves: on a terminal after about a second, or when asked."""

from __future__ import annotations

import sys
import time
from typing import Optional

from . import _validate


class Progress:
    """Prints ``label iter N | marginal error E | eps e`` on one refreshed stderr line
    (``measure`` names E: the sparse solver's is its gradient norm); a field without a
    value (None: the error during eps-scaling stages, eps for sparse OT) is left out. A
    NaN or inf error is printed as such: it says a problem diverged.

    ``verbose=None`` (default): only when stderr is a terminal and the run has
    lasted more than ``after`` seconds. ``True``: always. ``False``: never. Without a
    stderr (``sys.stderr`` None, as under pythonw or some service hosts) or when writing to
    it fails (a closed descriptor), nothing is printed and the solve goes on: a progress
    line never ends a solve (a review: both raised from every default solve).
    """

    def __init__(self, verbose: Optional[bool], label: str, after: float = 1.0, measure: str = "marginal error"):
        self.label, self.measure = label, measure
        if verbose is not None:
            verbose = _validate.flag("verbose", verbose, "True, False or None")
        self.enabled = bool(verbose) if verbose is not None else _is_terminal(sys.stderr)
        self.after = 0.0 if verbose else after
        self.start = time.perf_counter()
        self.last = 0.0
        self.printed = False
        self.width = 0

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

    def update(self, it: int, err: Optional[float], eps: Optional[float], stage: str = "") -> None:
        """One refresh, if :meth:`due`; ``err`` or ``eps`` None (not known, or none) are left out."""
        if not self.due():
            return
        now = self.elapsed
        self.last = now
        self.printed = True
        fields = [f"{self.label} iter {it:6d}"]
        if err is not None:
            fields.append(f"{self.measure} {err:.3e}")
        if eps is not None:
            fields.append(f"eps {eps:.3g}")
        fields += [stage] if stage else []
        line = f"{' | '.join(fields)} | {now:6.1f}s "
        # the line can shrink (a field left out, another stage): pad over the longest one yet
        self.width = max(self.width, len(line))
        self._write("\r" + line.ljust(self.width))

    def close(self) -> None:
        """End the line (once: a stage that closes it, e.g. SNS's warm-up, and the solve's
        own close print one newline between them, not two)."""
        if self.printed:
            self._write("\n")
            self.printed = False
            self.width = 0

    def _write(self, text: str) -> None:
        """To stderr; no stderr, or one that fails, turns the line off."""
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):  # None; a closed descriptor; a closed file
            self.enabled = self.printed = False


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):  # None (no stderr), a closed file
        return False
