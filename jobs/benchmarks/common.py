"""Shared by every benchmark mode: the mode registry, manifests and prompts, timing, peak RSS, machine info."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.validation import PRIOR_MIN_STEPS

REPO = Path(__file__).resolve().parents[2]
NOUNS = ("fox", "cat", "lighthouse", "city", "forest", "mountain", "boat", "tree", "robot", "castle", "river", "owl")
ADJECTIVES = ("red", "misty", "ancient", "futuristic", "tiny", "giant", "golden", "frozen", "quiet", "stormy")
STYLES = ("watercolor", "oil painting", "photo", "pixel art", "pencil sketch", "woodcut")


@dataclass(frozen=True, kw_only=True)
class Mode:
    """One ``benchmark`` sub-command: its flags, the function that runs it and returns its JSON figures.

    ``help`` None: a hidden helper mode that other modes start as a subprocess. ``quiet_libraries``:
    silence diffusers/transformers warnings and progress bars first (modes that load models).
    """

    name: str
    help: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    quiet_libraries: bool = False


def prompt(i: int) -> str:
    """A deterministic, varied prompt; distinct for i below 720."""
    return (
        f"a {ADJECTIVES[i % 10]} {NOUNS[(i // 10) % 12]} at {('dawn', 'dusk', 'night')[(i // 120) % 3]}, "
        f"{STYLES[(i // 360) % 6]}"
    )


def write_manifest(
    path: Path, *, num_rows: int, size: int = 64, steps: int = 10, prior_steps: int | None = None
) -> str:
    """A text2img manifest: ``num_rows`` rows of distinct prompts, one image each, ``size`` square.

    ``steps`` decoder steps, ``prior_steps`` prior steps (default: ``steps``, at least the prior's
    fewest valid steps, so a one-step decoder benchmark still passes validation).
    """
    if prior_steps is None:
        prior_steps = max(steps, PRIOR_MIN_STEPS)
    rows = {
        "id": [f"row-{i:06d}" for i in range(num_rows)],
        "prompt": [prompt(i) for i in range(num_rows)],
        "seed": list(range(num_rows)),
        "height": [size] * num_rows,
        "width": [size] * num_rows,
        "num_inference_steps": [steps] * num_rows,
        "prior_num_inference_steps": [prior_steps] * num_rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return str(path)


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM where /proc has it (ru_maxrss keeps a forking parent's)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def subprocess_env() -> dict[str, str]:
    """This environment for a benchmark's child process: no RAY_ADDRESS, offline hub, this checkout first."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def timed(command: list[str], *, log: Path) -> float:
    """Seconds from spawning ``command`` to its exit; raises with the log tail when it fails."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[:5])} ... exited {proc.returncode}:\n{tail}")
    return seconds


def machine() -> dict[str, Any]:
    """CPU count, platform and Python version: the ``machine`` field of every mode's JSON."""
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
