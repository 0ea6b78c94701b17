"""Where a run's seconds go: named moments, in seconds since the job started, for stats.json and the summary.

The job starts when its command does (`command_started`: the first import of the ``jobs`` package,
so the entry point's imports count, not what ran before it in the same process: a shell that
``exec``s the command after ``pip install ... &&`` keeps its process and its start time), or, for
a program that calls `jobs.job.run_job` itself, when it calls it.
"""

from __future__ import annotations

import os
import sys
import time

import jobs

# What sys.argv[0] is called when this process runs an entry point: the console script, python -m jobs.render / cli.
ENTRY_POINTS = ("kandinsky-render", "render.py", "cli.py")
_commands = 0  # entry-point calls in this process so far


def command_started() -> float:
    """Epoch seconds when this command started: from the first import of the ``jobs`` package when this process
    runs an entry point and this is its first call; else (a program or test calling an entry point) from now."""
    global _commands
    _commands += 1
    own = _commands == 1 and os.path.basename(sys.argv[0] if sys.argv else "") in ENTRY_POINTS
    return jobs.IMPORTED_AT if own else time.time()


class Timeline:
    """Moments of one run: `mark` records the first time each name happens (wall clock)."""

    def __init__(self, *, started: float | None = None) -> None:
        self.started = time.time() if started is None else started
        self.marks: dict[str, float] = {}

    def mark(self, name: str, at: float | None = None) -> None:
        """Record ``name`` now (or at epoch seconds ``at``) unless it was recorded before."""
        self.marks.setdefault(name, time.time() if at is None else at)

    def mark_monotonic(self, name: str, at: float) -> None:
        """Record ``name`` at ``time.monotonic()`` reading ``at`` (the runner's clock)."""
        self.mark(name, time.time() - (time.monotonic() - at))

    def since_start(self, name: str) -> float | None:
        """Seconds from the job's start to ``name``, None when it did not happen."""
        at = self.marks.get(name)
        return None if at is None else round(at - self.started, 3)

    def seconds(self) -> dict[str, float]:
        """Every moment as seconds since the job's start, in the order they happened."""
        return {name: round(at - self.started, 3) for name, at in sorted(self.marks.items(), key=lambda kv: kv[1])}
