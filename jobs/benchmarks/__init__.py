"""``kandinsky-render benchmark``: speed, memory and scale figures, one module per mode (see BENCHMARKS.md).

Every mode prints readable lines, then one JSON object as its last line. Speed is only ever
measured here, never asserted by tests. Each module holds a ``MODES`` tuple that
`jobs.benchmarks.cli` registers; shared helpers live in `common`.
"""

from __future__ import annotations

from jobs.benchmarks.cli import build_parser, main

__all__ = ["build_parser", "main"]
