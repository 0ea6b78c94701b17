"""Running ``kandinsky-render benchmark`` from tests: in a process of its own (modes that start a Ray of their own),
and its last line read as JSON."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator

import pytest

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


def benchmark_in_process(capsys: pytest.CaptureFixture, *first: str) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """For a fixture: ``kandinsky-render benchmark FIRST... ARGS`` in this process, for modes that start no Ray:
    (exit status, stdout, stderr); torch's thread count, which ``--threads`` sets, is put back after."""
    import torch

    from jobs.benchmarks.cli import main

    threads = torch.get_num_threads()

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([*first, *args])
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    torch.set_num_threads(threads)
