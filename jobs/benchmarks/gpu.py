"""Mode ``gpu``: decoder images/s per GPU at several batch sizes vs diffusers' Combined pipeline, same run."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.layout import StageCosts, choose
from jobs.benchmarks.common import Mode, machine, write_manifest
from jobs.dev.real_size import build_real_size_models
from jobs.dev.reference import combined_pipeline


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``gpu``: decoder images/s per GPU at several batch sizes vs the Combined pipeline, same run.

    Real-size random-weight models (``--tiny``: the tiny test models, for a dry run on any device).
    Also renders a few rows in float32 with both to check equality, and in float16 to measure drift.
    """
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from jobs.dev.tiny_models import build_tiny_models
    from jobs.planning.run_plan import manifest_work
    from schemas.config import AccelOptions, JobConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "")
    if not device:
        raise ValueError("benchmark gpu needs a CUDA device (or --device cpu --tiny for a dry run)")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-", dir=_fast_tmp()))
    started = time.perf_counter()
    if args.models:
        models = args.models
    elif args.tiny:
        models = str(work_dir / "models")
        build_tiny_models(models)
    else:
        models = build_real_size_models(work_dir / "models", device=device)
    build_seconds = time.perf_counter() - started
    kind = args.models or ("tiny" if args.tiny else "real-size, random weights")
    print(f"models ready in {build_seconds:.1f} s ({kind})")
    dtype_name = args.dtype
    dtype = getattr(torch, dtype_name)
    batch_sizes = sorted(args.batch_sizes)
    num_rows = max(batch_sizes) * (args.timed_batches + 1)
    manifest = write_manifest(
        work_dir / "manifest.parquet", num_rows=num_rows, size=args.size, steps=args.steps, prior_steps=args.prior_steps
    )
    rows = pq.read_table(manifest).to_pylist()
    extra = {"num_inference_steps": args.steps, "prior_num_inference_steps": args.prior_steps}

    # diffusers' Combined pipeline, one row per call, as a user would loop over a manifest
    pipe = combined_pipeline(models, dtype=dtype, device=device)
    combined_kwargs = {"height": args.size, "width": args.size, **extra}
    out_dir = work_dir / "combined"
    out_dir.mkdir(exist_ok=True)

    def combined_row(pipe: Any, row: dict) -> None:
        image = pipe(prompt=row["prompt"], generator=torch.Generator("cpu").manual_seed(row["seed"]), **combined_kwargs)
        image.images[0].save(out_dir / f"{row['id']}.png")

    combined_row(pipe, rows[0])  # warm-up
    _synchronize(device)
    timed = rows[1 : 1 + args.combined_rows]
    t0 = time.perf_counter()
    for row in timed:
        combined_row(pipe, row)
    _synchronize(device)
    combined_rate = len(timed) / (time.perf_counter() - t0)
    print(f"diffusers Combined, 1 row per call: {combined_rate:.3f} images/s per GPU", flush=True)
    del pipe
    _release(device)

    # ours: the prior and decoder stage classes, as each actor runs them
    accel = AccelOptions(channels_last=args.channels_last, compile=args.compile)
    config = JobConfig(manifest=manifest, output=str(work_dir / "ours"), batch_size=max(batch_sizes))
    work = manifest_work(config).batches.work
    prior = PriorActor(f"{models}/prior", dtype=dtype_name, device=device, accel=accel, worker="bench")
    prior_bs = max(batch_sizes)
    prior(work.slice(0, prior_bs))  # warm-up
    _synchronize(device)
    t0 = time.perf_counter()
    embeds = pa.concat_tables([prior(work.slice(s, prior_bs)) for s in range(0, work.num_rows, prior_bs)])
    _synchronize(device)
    prior_seconds = (time.perf_counter() - t0) / work.num_rows
    print(f"prior stage (batch {prior_bs}): {prior_seconds * 1000:.1f} ms per image", flush=True)
    del prior
    _release(device)
    # Pixels out, as in the job: PNG encoding and upload run in the writer actors, off the GPU's path.
    decoder = DecoderActor(
        {"text2img": f"{models}/decoder"},
        dtype=dtype_name,
        device=device,
        accel=accel,
        worker="bench",
    )
    per_batch = []
    for batch_size in batch_sizes:
        decoder(embeds.slice(0, batch_size))  # warm-up (and compile, if asked)
        _synchronize(device)
        t0 = time.perf_counter()
        for k in range(args.timed_batches):
            results = decoder(embeds.slice(batch_size * (k + 1), batch_size))
        _synchronize(device)
        rate = batch_size * args.timed_batches / (time.perf_counter() - t0)
        errors = [error for error in results.column("error").to_pylist() if error is not None]
        per_batch.append({"batch_size": batch_size, "decoder_images_per_s": round(rate, 4), "errors": len(errors)})
        print(f"decoder stage, batch {batch_size}: {rate:.3f} images/s per decoder GPU", flush=True)
    del decoder
    _release(device)
    best = max(per_batch, key=lambda r: r["decoder_images_per_s"])
    decoder_seconds = 1 / best["decoder_images_per_s"]
    shared_rate = 1 / (decoder_seconds + prior_seconds)
    costs = StageCosts(prior=prior_seconds, decoder=decoder_seconds, source="measured by this benchmark")
    eight = choose(num_gpus=8, costs=costs)
    print(
        f"per GPU, prior cost included: {shared_rate:.3f} images/s = {shared_rate / combined_rate:.2f}x Combined "
        f"(target >= 1.2x); decoder GPU alone {best['decoder_images_per_s']:.3f} images/s"
    )
    equality = _precision_check(args, models=models, device=device, work_dir=work_dir)
    return {
        "mode": "gpu",
        "machine": {**machine(), "device": _device_name(device)},
        "models": kind,
        "size": args.size,
        "steps": args.steps,
        "prior_steps": args.prior_steps,
        "dtype": dtype_name,
        "accel": {"channels_last": args.channels_last, "compile": args.compile, "attention": "sdpa"},
        "combined_images_per_s": round(combined_rate, 4),
        "prior_seconds_per_image": round(prior_seconds, 5),
        "batches": per_batch,
        "best_batch_size": best["batch_size"],
        "images_per_s_per_gpu": round(shared_rate, 4),
        "speedup_vs_combined": round(shared_rate / combined_rate, 3),
        "decoder_only_speedup_vs_combined": round(best["decoder_images_per_s"] / combined_rate, 3),
        "eight_gpus": {"flags": eight.flags(), "images_per_s": round(eight.images_per_s, 3), "note": eight.note},
        **equality,
        "build_seconds": round(build_seconds, 1),
    }


def _precision_check(args: argparse.Namespace, *, models: str, device: str, work_dir: Path) -> dict[str, Any]:
    """Render ``--check-rows`` rows with few steps: ours vs Combined in float32, and ours in float16."""
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from jobs.planning.run_plan import manifest_work
    from schemas.config import AccelOptions, JobConfig

    if args.check_rows <= 0:
        return {}
    steps = args.check_steps
    manifest = write_manifest(work_dir / "check.parquet", num_rows=args.check_rows, size=args.size, steps=steps)
    rows = pq.read_table(manifest).to_pylist()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 on both sides
    try:
        pipe = combined_pipeline(models, dtype=torch.float32, device=device)
        reference = {}
        for row in rows:
            image = pipe(
                prompt=row["prompt"],
                generator=torch.Generator("cpu").manual_seed(row["seed"]),
                height=args.size,
                width=args.size,
                num_inference_steps=steps,
                prior_num_inference_steps=steps,
            ).images[0]
            reference[row["id"]] = np.asarray(image, dtype=np.int16)
        del pipe
        _release(device)
        figures = {}
        for dtype_name in ("float32", args.dtype):
            config = JobConfig(manifest=manifest, output=str(work_dir / f"check-{dtype_name}"), batch_size=len(rows))
            work = manifest_work(config).batches.work
            accel = AccelOptions(channels_last=args.channels_last)
            prior = PriorActor(f"{models}/prior", dtype=dtype_name, device=device, accel=accel)
            embeds = prior(work)
            del prior
            decoder = DecoderActor(
                {"text2img": f"{models}/decoder"},
                dtype=dtype_name,
                device=device,
                accel=accel,
            )
            results = decoder(embeds).to_pylist()
            del decoder
            _release(device)
            diffs = []
            for result in results:
                if result["error"] is not None:
                    figures[dtype_name] = {"error": result["error"]}
                    break
                shape = (result["pixel_height"], result["pixel_width"], 3)
                pixels = np.frombuffer(result["pixels"], np.uint8).reshape(shape).astype(np.int16)
                diffs.append(np.abs(pixels - reference[result["id"]]))
            else:
                stacked = np.stack(diffs)
                figures[dtype_name] = {
                    "max_level_difference": int(stacked.max()),
                    "mean_level_difference": round(float(stacked.mean()), 4),
                    "share_over_1_level": round(float((stacked > 1).mean()), 6),
                }
            print(f"vs Combined float32 ({len(rows)} rows, {steps} steps): ours {dtype_name} {figures[dtype_name]}")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"check_rows": len(rows), "check_steps": steps, "vs_combined_float32": figures}


def _fast_tmp() -> str | None:
    """RAM-backed /dev/shm when it exists: real-size checkpoints are written and read back once."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return device


def add_arguments(gpu: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark gpu``."""
    gpu.add_argument("--device", help="torch device (default: cuda)")
    gpu.add_argument("--tiny", action="store_true", help="tiny test models instead of real-size ones (dry run)")
    gpu.add_argument("--models", help="checkpoints to use (DIR/prior, DIR/decoder), e.g. the real weights")
    gpu.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="timed dtype")
    gpu.add_argument("--size", type=int, default=768, help="height and width")
    gpu.add_argument("--steps", type=int, default=50, help="decoder steps")
    gpu.add_argument("--prior-steps", type=int, default=25, help="prior steps")
    gpu.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="decoder batch sizes")
    gpu.add_argument("--timed-batches", type=int, default=2, help="timed decoder calls per batch size")
    gpu.add_argument("--combined-rows", type=int, default=4, help="timed Combined pipeline rows")
    gpu.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC weights")
    gpu.add_argument("--compile", action="store_true", help="torch.compile the UNet (adds compile time)")
    gpu.add_argument("--check-rows", type=int, default=2, help="rows rendered for the float32/float16 check")
    gpu.add_argument("--check-steps", type=int, default=10, help="prior and decoder steps of the check")
    gpu.add_argument("--work-dir", help="where checkpoints go (default: a new dir in /dev/shm)")


MODES = (
    Mode(
        name="gpu",
        help="decoder images/s per GPU vs the Combined pipeline",
        add_arguments=add_arguments,
        run=run_gpu,
        quiet_libraries=True,
    ),
)
