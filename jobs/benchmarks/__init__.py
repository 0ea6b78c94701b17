"""``kandinsky-render benchmark``: speed, memory and scale figures, one module per mode (see BENCHMARKS.md).

Every mode prints readable lines, then one JSON object as its last line. Speed is only ever
measured here, never asserted by tests. One module per mode (`cpu`, `simulated`, `plan`, `gpu`, `score`),
each with a ``MODES`` tuple that `jobs.benchmarks.cli` registers; shared helpers in `common`; the
Ray Data wiring that ``simulated --wiring ray-data`` compares with in `ray_data`.
"""

from __future__ import annotations

from jobs.benchmarks.cli import build_parser, main

__all__ = ["build_parser", "main"]
