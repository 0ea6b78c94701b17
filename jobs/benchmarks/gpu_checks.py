"""Parts of ``benchmark gpu``: pre-flight checks, the time budget and its deadline, timed calls, host syncs counted,
peak FLOP/s, memory release."""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GIB = 2**30
# fp16 bytes of the real-size random checkpoints (jobs/dev/real_size.py): UNet 1.253 B + MoVQ 68 M +
# prior 1.03 B + CLIP image 1.84 B + text 0.69 B parameters (tests/test_benchmark.py checks them).
REAL_SIZE_BYTES = 2 * (1.253 + 0.068 + 1.03 + 1.84 + 0.69) * 1e9


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str | None]:
    """(the device's dense fp16 peak in TFLOP/s, its `cluster.defaults.ACCELERATORS` key): ``override`` if given,
    else the peak `cluster.defaults` lists for the type torch's device name names (None: not listed)."""
    from cluster.accelerators import accelerator_from_device_name, accelerator_spec

    accelerator = accelerator_from_device_name(device_name)
    if override:
        return override, accelerator
    spec = accelerator_spec(accelerator) if accelerator else None
    return (spec.peak_tflops if spec else None), accelerator


class FakeClock:
    """A clock for dry runs and tests: every reading is ``step`` seconds after the one before (the first is 0)."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, -step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Budget:
    """Seconds left of the benchmark's run, read on ``clock`` (monotonic wall seconds unless a test gives another);
    phases ask before they start and before each timed call."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.seconds = clock, seconds
        self.started = clock()

    def used(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.used()

    def afford(self, seconds: float, *, keep: float = 0.0) -> bool:
        """Whether ``seconds`` more still leave ``keep`` seconds for what must come after."""
        return self.left() - keep >= seconds


class Deadline:
    """Interrupts the main thread (KeyboardInterrupt) ``seconds`` from now unless cancelled: the phase running then
    (a compile that takes longer than its estimate) stops, and the run goes straight to its summary."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._main = threading.main_thread().ident
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        signal.pthread_kill(self._main, signal.SIGINT)  # wakes a blocking wait, unlike _thread.interrupt_main

    def cancel(self) -> None:
        self._timer.cancel()


@dataclass(kw_only=True)
class SyncCount:
    """Host syncs torch's sync debug mode saw (None: not counted, e.g. on the CPU), the top call sites."""

    count: int | None = None
    sites: list[tuple[str, int]] = field(default_factory=list)


@contextlib.contextmanager
def counting_syncs(device: str) -> Iterator[SyncCount]:
    """Count the synchronizing CUDA operations inside the block: ``torch.cuda.set_sync_debug_mode("warn")`` makes
    each one a warning ("called a synchronizing CUDA operation"), recorded here. On the CPU nothing is counted."""
    found = SyncCount()
    if not device.startswith("cuda"):
        yield found
        return
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not once per call site
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    found.count = len(syncs)
    found.sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs).most_common(5)


@dataclass(kw_only=True)
class Timing:
    """A warm-up call (its output: ``first``), then as many timed calls as the budget allowed (``seconds``)."""

    warm_up_s: float
    first: Any = None
    seconds: list[float] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    syncs: SyncCount = field(default_factory=SyncCount)

    def per_call(self) -> float:
        """Seconds per call: the timed calls' mean, the warm-up's time if none fitted the budget."""
        return sum(self.seconds) / len(self.seconds) if self.seconds else self.warm_up_s


def time_calls(
    run: Callable[[int], Any],
    *,
    max_calls: int,
    budget: Budget,
    keep: float,
    sync: Callable[[], None],
    estimate: float | None = None,
    count_syncs: Callable[[], Any] | None = None,
) -> Timing:
    """``run(0)`` as a warm-up, then ``run(1)``, ``run(2)``... up to ``max_calls`` while the budget affords one more
    and still keeps ``keep`` seconds. A call's time is estimated by the last one; the first by ``estimate`` (a
    compiling warm-up says nothing of the calls after it), else by the warm-up. ``count_syncs``: a context manager
    (`counting_syncs`) wrapped around the first timed call; its count lands in ``syncs``. Times are read on the
    budget's clock."""
    clock = budget.clock
    started = clock()
    first = run(0)
    sync()
    timing = Timing(warm_up_s=clock() - started, first=first)
    for k in range(1, max_calls + 1):
        expected = timing.seconds[-1] if timing.seconds else (timing.warm_up_s if estimate is None else estimate)
        if not budget.afford(expected, keep=keep):
            break
        counting = count_syncs() if k == 1 and count_syncs is not None else contextlib.nullcontext(timing.syncs)
        with counting as syncs:  # the call only: the explicit sync after it is ours, not the call's
            started = clock()
            output = run(k)
        sync()
        timing.seconds.append(clock() - started)
        timing.syncs = syncs
        timing.outputs.append(output)
    return timing


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What the checks found: where the checkpoints go (``created``: a scratch folder of this run, removed at its
    end) and the device's free memory."""

    work_dir: Path
    created: bool
    lines: list[str]
    free_gpu_gib: float | None


def preflight(args: argparse.Namespace, *, device: str) -> Preflight:
    """Refuse early (ValueError: exit status 2) what cannot finish: no CUDA, no room for the weights, a full GPU.

    Real-size weights (``REAL_SIZE_BYTES``, fp16) go to ``--work-dir`` if given, else to a new scratch folder in
    the first of /dev/shm (RAM-backed; often 64 MB in containers) and the temporary folder with room for them.
    """
    import torch

    lines = []
    refusal = "benchmark gpu needs a CUDA device (or --device cpu --tiny for a dry run)"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(refusal)
        free, total = torch.cuda.mem_get_info(torch.device(device))
        lines.append(
            f"GPU {torch.cuda.get_device_name(torch.device(device))}: {free / GIB:.1f} of {total / GIB:.1f} GiB free"
        )
        if free / GIB < args.min_free_gpu_gib:
            raise ValueError(
                f"{device} has {free / GIB:.1f} GiB free; the benchmark needs {args.min_free_gpu_gib:g} GiB "
                "(--min-free-gpu-gib): another process holds it?"
            )
        free_gpu = free / GIB
    elif not args.tiny:
        raise ValueError(refusal)
    else:
        free_gpu = None
    needed = 0.0 if (args.models or args.tiny) else REAL_SIZE_BYTES * 1.05
    candidates = [Path(args.work_dir)] if args.work_dir else [Path("/dev/shm"), Path(tempfile.gettempdir())]
    checked = []
    for folder in candidates:
        free_bytes = _free_bytes(folder)
        checked.append(f"{folder}: {free_bytes / 1e9:.2f} GB free")
        if free_bytes >= needed:
            created = not args.work_dir
            work_dir = Path(tempfile.mkdtemp(prefix="kandinsky-bench-", dir=folder)) if created else folder
            work_dir.mkdir(parents=True, exist_ok=True)
            kept = "removed at the end" if created else "kept"
            lines.append(f"checkpoints and scratch in {work_dir} ({checked[-1]}; needs {needed / 1e9:.1f} GB; {kept})")
            return Preflight(work_dir=work_dir, created=created, lines=lines, free_gpu_gib=free_gpu)
    raise ValueError(
        f"no folder has the {needed / 1e9:.1f} GB the real-size checkpoints need ({'; '.join(checked)}); "
        "pass --work-dir on a disk with room, or --models DIR"
    )


def _free_bytes(folder: Path) -> float:
    """Free bytes where ``folder`` is (or would be created), 0 if it cannot be written."""
    probe = folder if folder.exists() else folder.parent
    if not probe.exists() or not os.access(probe, os.W_OK):
        return 0.0
    return float(shutil.disk_usage(probe).free)


def pixels_of(result: dict) -> np.ndarray:
    """A decoded results row's (height, width, 3) uint8 image."""
    return np.frombuffer(result["pixels"], np.uint8).reshape(result["pixel_height"], result["pixel_width"], 3)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Free what the last phase left: the models actors of this process share (`actors.common.shared_model`),
    compiled code, reference cycles, and on CUDA the allocator's cached blocks."""
    import gc
    import sys

    import torch

    from actors.common import release_shared_models

    release_shared_models()
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()  # compiled graphs hold on to the modules they were compiled for
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
