"""Running ``kandinsky-render benchmark`` from tests: in a process of its own (modes that start a Ray of their own),
and its last line read as JSON."""

from __future__ import annotations

import json
import subprocess

from tests.helpers.cli import run


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def benchmark_process(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``kandinsky-render benchmark ARGS`` in a process of its own: for modes that start a Ray of their own."""
    return run("benchmark", *args, timeout=timeout)


def run_benchmark(*args: str, timeout: int = 300) -> dict:
    """`benchmark_process`, checked to succeed; its last line as JSON."""
    proc = benchmark_process(*args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_json(proc.stdout)
