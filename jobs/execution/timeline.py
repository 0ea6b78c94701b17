"""Where a run's seconds go: named moments, in seconds since the process started, for stats.json and the summary.

The process start is the kernel's record of it (``/proc/self/stat``), so interpreter start-up and
imports count too; where that cannot be read, the moment this module was first imported.
"""

from __future__ import annotations

import os
import time


def _process_started() -> float:
    """Epoch seconds when this process started (Linux: from /proc), else now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


PROCESS_STARTED = _process_started()


class Timeline:
    """Moments of one run: `mark` records the first time each name happens (wall clock)."""

    def __init__(self, *, started: float = PROCESS_STARTED) -> None:
        self.started = started
        self.marks: dict[str, float] = {}

    def mark(self, name: str, at: float | None = None) -> None:
        """Record ``name`` now (or at epoch seconds ``at``) unless it was recorded before."""
        self.marks.setdefault(name, time.time() if at is None else at)

    def mark_monotonic(self, name: str, at: float) -> None:
        """Record ``name`` at ``time.monotonic()`` reading ``at`` (the runner's clock)."""
        self.mark(name, time.time() - (time.monotonic() - at))

    def since_start(self, name: str) -> float | None:
        """Seconds from process start to ``name``, None when it did not happen."""
        at = self.marks.get(name)
        return None if at is None else round(at - self.started, 3)

    def seconds(self) -> dict[str, float]:
        """Every moment as seconds since process start, in the order they happened."""
        return {name: round(at - self.started, 3) for name, at in sorted(self.marks.items(), key=lambda kv: kv[1])}
