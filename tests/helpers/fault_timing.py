"""Figures for README's Faults table: each fault test prints its wall time and, when asked, a clean run's.

``KANDINSKY_RENDER_FAULT_BASELINE=1 python -m pytest -s tests/test_flaky_storage.py ... | grep FAULT`` also
runs the same work without the fault, so the two times can be compared on the same machine and load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

BASELINE_ENV = "KANDINSKY_RENDER_FAULT_BASELINE"


def report(name: str, seconds: float, detail: str = "") -> None:
    """One ``FAULT`` line (pytest shows it with ``-s``)."""
    print(f"\nFAULT {name}: {seconds:.1f} s{' ' + detail if detail else ''}", flush=True)


def baseline(name: str, run: Callable[[], Any]) -> None:
    """Time ``run()`` (the same work without the fault) when `BASELINE_ENV` is set; print a ``FAULT`` line."""
    if os.environ.get(BASELINE_ENV) != "1":
        return
    started = time.monotonic()
    run()
    report(f"{name} (clean run of the same work)", time.monotonic() - started)
