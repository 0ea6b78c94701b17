"""The command line, as tests run it: in this process (exit status and output) or as a process of its own.

A process of its own only where that is what is under test (signals, a fresh interpreter, joining a
cluster, exit on a real Ctrl-C): it imports torch and Ray afresh and, unless it renders locally or
dry, starts a Ray of its own. Everything else renders in-process on the shared Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import pytest

from tests.helpers.places import REPO

# Variables that point a process at a Ray cluster: a process the test starts joins only what the test names.
RAY_POINTERS = ("RAY_ADDRESS",)


def clean_env(extra: Mapping[str, str] | None = None, *, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a child: without `RAY_POINTERS` (and ``drop``), with ``extra`` set, and this
    interpreter's folder first on PATH (as an activated virtualenv has it), so ``python``, ``ray`` and
    ``kandinsky-render`` in a child (a Ray job's entrypoint) are this environment's whether or not it was activated."""
    env = {key: value for key, value in os.environ.items() if key not in (*RAY_POINTERS, *drop)}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), *filter(None, [env.get("PATH")])])
    env.update(extra or {})
    return env


def command(*args: str, module: str = "jobs.cli") -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter (``jobs.cli`` is the ``kandinsky-render`` console script)."""
    return [sys.executable, "-m", module, *args]


def run(
    *args: str, module: str = "jobs.cli", env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the command line in a process of its own (from the repository, `clean_env` plus ``env``); wait for it."""
    return subprocess.run(
        command(*args, module=module),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=timeout,
    )


def start(
    *args: str,
    module: str = "jobs.cli",
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = subprocess.PIPE,
    stderr: IO[Any] | int | None = subprocess.PIPE,
    **popen: Any,
) -> subprocess.Popen:
    """Start the command line in a process of its own (signals, kills, timing); the caller waits for it."""
    return subprocess.Popen(
        command(*args, module=module), cwd=REPO, env=clean_env(env), stdout=stdout, stderr=stderr, text=True, **popen
    )


@dataclass(frozen=True)
class Outcome:
    """What a command run in this process ended with."""

    code: int
    out: str
    err: str


def in_process(capsys: pytest.CaptureFixture, *args: str) -> Outcome:
    """``kandinsky-render ARGS`` in this process (argparse's own refusals included): exit status, stdout, stderr."""
    from jobs.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return Outcome(code=code, out=out, err=err)
