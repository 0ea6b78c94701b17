"""Parts of ``benchmark gpu``: pre-flight checks, the time budget, timed calls, the equality check, peak FLOP/s."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.benchmarks.common import write_manifest
from jobs.dev.reference import combined_pipeline

GIB = 2**30
# fp16 bytes of the real-size random checkpoints (jobs/dev/real_size.py): UNet 1.253 B + MoVQ 68 M +
# prior 1.03 B + CLIP image 1.84 B + text 0.69 B parameters (tests/test_benchmark.py checks them).
REAL_SIZE_BYTES = 2 * (1.253 + 0.068 + 1.03 + 1.84 + 0.69) * 1e9
# Dense fp16/bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name (the first
# match wins: the PCIe and NVL H100s before the SXM one).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The device's dense fp16 peak in TFLOP/s: ``override`` if given, else `PEAK_TFLOPS`, else None."""
    if override:
        return override
    return next((tflops for name, tflops in PEAK_TFLOPS if name in device_name), None)


class Budget:
    """Wall seconds left of the benchmark's run; phases ask before each timed call."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.seconds = seconds

    def used(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.used()

    def afford(self, seconds: float, *, keep: float = 0.0) -> bool:
        """Whether ``seconds`` more still leave ``keep`` seconds for what must come after."""
        return self.left() - keep >= seconds


@dataclass(kw_only=True)
class Timing:
    """A warm-up call, then as many timed calls as the budget allowed (``seconds``), with their outputs."""

    warm_up_s: float
    seconds: list[float] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)

    def per_call(self) -> float:
        """Seconds per call: the timed calls' mean, the warm-up's time if none fitted the budget."""
        return sum(self.seconds) / len(self.seconds) if self.seconds else self.warm_up_s


def time_calls(
    run: Callable[[int], Any], *, max_calls: int, budget: Budget, keep: float, sync: Callable[[], None]
) -> Timing:
    """``run(0)`` as a warm-up, then ``run(1)``, ``run(2)``... up to ``max_calls`` while the budget affords one more
    (estimated by the last call, the warm-up for the first) and still keeps ``keep`` seconds."""
    started = time.perf_counter()
    run(0)
    sync()
    timing = Timing(warm_up_s=time.perf_counter() - started)
    for k in range(1, max_calls + 1):
        if not budget.afford(timing.seconds[-1] if timing.seconds else timing.warm_up_s, keep=keep):
            break
        started = time.perf_counter()
        output = run(k)
        sync()
        timing.seconds.append(time.perf_counter() - started)
        timing.outputs.append(output)
    return timing


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What the checks found: where the checkpoints go and the device's free memory."""

    work_dir: Path
    lines: list[str]
    free_gpu_gib: float | None


def preflight(args: argparse.Namespace, *, device: str) -> Preflight:
    """Refuse early (ValueError: exit status 2) what cannot finish: no CUDA, no room for the weights, a full GPU.

    Real-size weights (``REAL_SIZE_BYTES``, fp16) go to ``--work-dir`` if given, else the first of
    /dev/shm (RAM-backed; often 64 MB in containers) and the temporary folder with room for them.
    """
    import torch

    lines = []
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("benchmark gpu needs a CUDA device (or --device cpu --tiny for a dry run)")
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
        raise ValueError("benchmark gpu needs a CUDA device (or --device cpu --tiny for a dry run)")
    else:
        free_gpu = None
    needed = 0.0 if (args.models or args.tiny) else REAL_SIZE_BYTES * 1.05
    candidates = [Path(args.work_dir)] if args.work_dir else [Path("/dev/shm"), Path(tempfile.gettempdir())]
    checked = []
    for folder in candidates:
        free_bytes = _free_bytes(folder)
        checked.append(f"{folder}: {free_bytes / 1e9:.2f} GB free")
        if free_bytes >= needed:
            work_dir = (
                Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="kandinsky-bench-", dir=folder))
            )
            lines.append(f"checkpoints and scratch in {work_dir} ({checked[-1]}; needs {needed / 1e9:.1f} GB)")
            return Preflight(work_dir=work_dir, lines=lines, free_gpu_gib=free_gpu)
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


def equality_check(args: argparse.Namespace, *, models: str, device: str, work_dir: Path) -> dict[str, Any]:
    """Render ``--check-rows`` rows at ``--check-steps``: ours vs Combined at equal batch composition.

    Combined renders one row per call, so our prior and decoder do too (``max_batch_size=1``): in
    float32 (TF32 off) the two must agree within 1 level; in ``--dtype`` the figure is the drift.
    """
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from jobs.planning.run_plan import manifest_work
    from schemas.config import AccelOptions, JobConfig
    from schemas.models import ModelPaths

    if args.check_rows <= 0:
        return {}
    steps = args.check_steps
    manifest = write_manifest(work_dir / "check.parquet", num_rows=args.check_rows, size=args.size, steps=steps)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 on both sides
    try:
        pipe = combined_pipeline(models, dtype=torch.float32, device=device)
        paths = ModelPaths.resolve(models_dir=models)
        config = JobConfig(manifest=manifest, output=str(work_dir / "check"), models=paths, batch_size=1)
        work = manifest_work(config).batches.work
        reference = {}
        for row in work.to_pylist():
            generator = torch.Generator("cpu").manual_seed(row["seed"])
            sizes = {"height": args.size, "width": args.size}
            image = pipe(
                prompt=row["prompt"],
                generator=generator,
                num_inference_steps=steps,
                prior_num_inference_steps=steps,
                **sizes,
            ).images[0]
            reference[row["id"]] = np.asarray(image, dtype=np.int16)
        del pipe
        release(device)
        figures = {}
        for dtype_name in dict.fromkeys(("float32", args.dtype)):
            accel = AccelOptions(channels_last=False)
            stage = {"dtype": dtype_name, "device": device, "accel": accel, "max_batch_size": 1}
            embeds = PriorActor(f"{models}/prior", **stage)(work)
            results = DecoderActor({"text2img": f"{models}/decoder"}, **stage)(embeds).to_pylist()
            release(device)
            figures[dtype_name] = _differences(results, reference)
            print(
                f"vs Combined float32, one row per call ({len(results)} rows, {steps} steps): "
                f"ours {dtype_name} {figures[dtype_name]}"
            )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"check_rows": args.check_rows, "check_steps": steps, "vs_combined_float32": figures}


def _differences(results: list[dict], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    diffs = []
    for result in results:
        if result["error"] is not None:
            return {"error": result["error"]}
        diffs.append(np.abs(pixels_of(result).astype(np.int16) - reference[result["id"]]))
    stacked = np.stack(diffs)
    return {
        "max_level_difference": int(stacked.max()),
        "mean_level_difference": round(float(stacked.mean()), 4),
        "share_over_1_level": round(float((stacked > 1).mean()), 6),
    }


def pixels_of(result: dict) -> np.ndarray:
    """A decoded results row's (height, width, 3) uint8 image."""
    return np.frombuffer(result["pixels"], np.uint8).reshape(result["pixel_height"], result["pixel_width"], 3)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
