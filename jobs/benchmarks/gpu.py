"""Mode ``gpu``: one unattended run on a GPU machine: decoder images/s, fraction of peak, compile and
channels-last, the Combined baseline, equality, and the figures the layout planner needs (BENCHMARKS.md e)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.layout import StageCosts, choose
from jobs.benchmarks.common import Mode, machine, write_manifest
from jobs.benchmarks.gpu_checks import (
    GIB,
    Budget,
    equality_check,
    peak_tflops,
    pixels_of,
    preflight,
    release,
    synchronize,
    time_calls,
)
from jobs.dev.real_size import build_real_size_models
from jobs.dev.reference import combined_pipeline


def layout_for(num_gpus: int, *, prior_seconds: float, decoder_seconds: float) -> dict[str, Any]:
    """The layout `cluster.layout.choose` picks for ``num_gpus`` GPUs at these busy seconds per image."""
    costs = StageCosts(prior=prior_seconds, decoder=decoder_seconds, source="measured by this benchmark")
    chosen = choose(num_gpus=num_gpus, costs=costs)
    return {"flags": chosen.flags(), "images_per_s": round(chosen.images_per_s, 3), "note": chosen.note}


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``gpu`` (see BENCHMARKS.md e): finishes within ``--budget-s``, trimming timed calls to fit."""
    import torch

    from actors.prior import PriorActor
    from jobs.dev.flops import image_flops
    from jobs.dev.tiny_models import build_tiny_models
    from jobs.planning.run_plan import manifest_work
    from schemas.config import AccelOptions, JobConfig
    from schemas.models import ModelPaths

    budget = Budget(args.budget_s)
    device = args.device or "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    checks = preflight(args, device=device)
    for line in checks.lines:
        print(f"pre-flight: {line}", flush=True)
    work_dir = checks.work_dir
    if args.models:
        models = args.models
    elif args.tiny:
        models = str(work_dir / "models")
        build_tiny_models(models)
    else:
        models = build_real_size_models(work_dir / "models", device=device)
    kind = args.models or ("tiny" if args.tiny else "real-size, random weights")
    print(f"models ready in {budget.used():.1f} s ({kind})", flush=True)
    flops = image_flops(models, height=args.size, width=args.size, steps=args.steps, prior_steps=args.prior_steps)
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else device
    peak = peak_tflops(name, args.peak_tflops)
    dtype, size, sync = getattr(torch, args.dtype), args.size, (lambda: synchronize(device))
    steps = {"num_inference_steps": args.steps, "prior_num_inference_steps": args.prior_steps}

    # diffusers' Combined pipeline, one row per call as a user would loop over a manifest (PIL out, no PNG)
    started = time.perf_counter()
    pipe = combined_pipeline(models, dtype=dtype, device=device)
    load_s = time.perf_counter() - started
    rows = [{"prompt": f"a red fox number {k}", "seed": k} for k in range(args.combined_rows + 1)]

    def combined(k: int) -> Any:
        generator = torch.Generator("cpu").manual_seed(rows[k]["seed"])
        return pipe(prompt=rows[k]["prompt"], generator=generator, height=size, width=size, **steps).images[0]

    # Kept for the equality check (three loads and a few short rows) and the variants' minimum.
    reserve = 4 * load_s + 30 if args.check_rows else 10
    combined_timing = time_calls(combined, max_calls=args.combined_rows, budget=budget, keep=reserve, sync=sync)
    combined_rate = 1 / combined_timing.per_call()
    print(f"diffusers Combined, 1 row per call: {combined_rate:.3f} images/s per GPU", flush=True)
    pipe = None  # frees the Combined pipeline's GPU memory
    release(device)

    # Ours: the prior and decoder stage classes, as each actor runs them
    batch_sizes = sorted(set(args.batch_sizes))
    largest = max(batch_sizes + [args.matrix_batch])
    manifest = write_manifest(
        work_dir / "manifest.parquet",
        num_rows=largest * (args.timed_batches + 1),
        size=size,
        steps=args.steps,
        prior_steps=args.prior_steps,
    )
    paths = ModelPaths.resolve(models_dir=models)
    config = JobConfig(manifest=manifest, output=str(work_dir / "ours"), models=paths, batch_size=largest)
    work = manifest_work(config).batches.work
    prior = PriorActor(
        f"{models}/prior",
        dtype=args.dtype,
        device=device,
        accel=AccelOptions(channels_last=False),
        max_batch_size=largest,
    )
    parts: list[pa.Table] = []
    prior_timing = time_calls(
        lambda k: parts.append(prior(work.slice(largest * k, largest))),
        max_calls=args.timed_batches,
        budget=budget,
        keep=reserve,
        sync=sync,
    )
    embeds = pa.concat_tables(parts)
    prior_seconds = prior_timing.per_call() / largest
    print(f"prior stage (batch {largest}): {prior_seconds * 1000:.1f} ms per image", flush=True)
    prior = None
    release(device)

    def decoder_run(*, batch: int, channels_last: bool, compile: bool) -> dict[str, Any]:
        from actors.decoder import DecoderActor

        started = time.perf_counter()
        warmup = [("text2img", size, size, batch)] if compile else []
        accel = AccelOptions(channels_last=channels_last, compile=compile)
        decoder = DecoderActor(
            {"text2img": f"{models}/decoder"},
            dtype=args.dtype,
            device=device,
            accel=accel,
            max_batch_size=batch,
            warmup=warmup,
        )
        ready_s = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        calls = embeds.num_rows // batch

        def call(k: int) -> pa.Table:
            return decoder(embeds.slice(batch * (k % calls), batch))

        timing = time_calls(call, max_calls=args.timed_batches, budget=budget, keep=reserve, sync=sync)
        errors = sum(t.column("error").null_count != t.num_rows for t in timing.outputs)
        figure = {
            "batch_size": batch,
            "channels_last": channels_last,
            "compile": compile,
            "ready_s": round(ready_s, 1),
            "warm_up_s": round(timing.warm_up_s, 2),
            "timed_calls": len(timing.seconds),
            "decoder_images_per_s": round(batch / timing.per_call(), 4),
            "calls_with_errors": errors,
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
            "first_call": [pixels_of(r) if r["error"] is None else None for r in timing.outputs[0].to_pylist()]
            if timing.outputs
            else None,
        }
        if compile:
            figure["compiled"] = bool(decoder.compiled)  # False: compiling failed, the run was eager
        if peak:
            figure["fraction_of_peak"] = round(figure["decoder_images_per_s"] * flops.decoder / (peak * 1e12), 4)
        what = f"decoder batch {batch}{', channels-last' if channels_last else ''}{', compiled' if compile else ''}"
        print(
            f"{what}: {figure['decoder_images_per_s']:.3f} images/s per decoder GPU "
            f"({len(timing.seconds)} timed calls, ready in {ready_s:.1f} s)",
            flush=True,
        )
        decoder = None
        release(device)
        return figure

    per_batch = []
    for batch in batch_sizes:
        if per_batch and not budget.afford(batch / per_batch[-1]["decoder_images_per_s"] * 2, keep=reserve):
            print(f"decoder batch {batch}: skipped, the budget is spent", flush=True)
            continue
        per_batch.append(decoder_run(batch=batch, channels_last=False, compile=False))
    equality = equality_check(args, models=models, device=device, work_dir=work_dir)
    reserve = 10.0  # the check is done: the matrix runs may use what is left
    # channels-last x compile at --matrix-batch, against the eager channels-first run of the same rows
    baseline = next((r for r in per_batch if r["batch_size"] == args.matrix_batch), None)
    if baseline is None:
        baseline = decoder_run(batch=args.matrix_batch, channels_last=False, compile=False)
    matrix = [baseline]
    compile_on = cuda if args.compile == "auto" else args.compile == "on"
    compile_s = 150.0  # a guess until the first compiled run measures it
    for channels_last, compile in ((True, False), (False, True), (True, True)):
        if compile and not compile_on:
            continue
        need = (compile_s if compile else 5.0) + 3 * args.matrix_batch / baseline["decoder_images_per_s"]
        if not budget.afford(need):
            print(f"batch {args.matrix_batch} channels_last={channels_last} compile={compile}: skipped (budget)")
            continue
        matrix.append(decoder_run(batch=args.matrix_batch, channels_last=channels_last, compile=compile))
        compile_s = matrix[-1]["ready_s"] if compile else compile_s
    matrix = [_versus(figure, baseline) for figure in matrix]
    best = max(per_batch + matrix, key=lambda r: r["decoder_images_per_s"])
    decoder_seconds = 1 / best["decoder_images_per_s"]
    shared_rate = 1 / (decoder_seconds + prior_seconds)
    result = {
        "mode": "gpu",
        "machine": {**machine(), "device": name},
        "models": kind,
        "size": size,
        "steps": args.steps,
        "prior_steps": args.prior_steps,
        "dtype": args.dtype,
        "budget_s": args.budget_s,
        "flops_per_image": {
            "decoder": flops.decoder,
            "unet_step": flops.unet_step,
            "movq": flops.movq,
            "prior": flops.prior,
        },
        "peak_tflops": peak,
        "combined_images_per_s": round(combined_rate, 4),
        "prior_seconds_per_image": round(prior_seconds, 5),
        "decoder_seconds_per_image": round(decoder_seconds, 5),
        "batches": [_public(r) for r in per_batch],
        "matrix": [_public(r) for r in matrix],
        "best": {k: best[k] for k in ("batch_size", "channels_last", "compile", "decoder_images_per_s")},
        "images_per_s_per_gpu": round(shared_rate, 4),
        "speedup_vs_combined": round(shared_rate / combined_rate, 3),
        "decoder_only_speedup_vs_combined": round(best["decoder_images_per_s"] / combined_rate, 3),
        "eight_gpus": layout_for(8, prior_seconds=prior_seconds, decoder_seconds=decoder_seconds),
        **equality,
        "seconds": round(budget.used(), 1),
    }
    _summary(result, best=best, flops_tflop=flops.decoder / 1e12, prior_tflop=flops.prior / 1e12)
    return result


def _versus(figure: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """``figure`` with its speed and its pixels relative to the eager, channels-first run of the same rows."""
    figure = dict(figure, speedup_vs_eager=round(figure["decoder_images_per_s"] / baseline["decoder_images_per_s"], 3))
    if figure["first_call"] and baseline["first_call"]:
        pairs = [
            (a, b) for a, b in zip(figure["first_call"], baseline["first_call"]) if a is not None and b is not None
        ]
        if pairs:
            figure["max_level_difference_vs_eager"] = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in pairs)
    return figure


def _public(figure: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figure.items() if k != "first_call"}


def _summary(result: dict[str, Any], *, best: dict[str, Any], flops_tflop: float, prior_tflop: float) -> None:
    """One line per figure, for the note that quotes this run."""
    lines = [
        f"decoder images/s per decoder GPU: {best['decoder_images_per_s']:.3f} (batch {best['batch_size']}, "
        f"channels-last {best['channels_last']}, compile {best['compile']})",
        f"fraction of peak: {best['fraction_of_peak']:.1%} of {result['peak_tflops']:g} TFLOP/s"
        if "fraction_of_peak" in best
        else f"fraction of peak: unknown for {result['machine']['device']} (pass --peak-tflops)",
        f"FLOPs per image: {flops_tflop:.4g} TFLOP decoder ({result['size']}x{result['size']}, "
        f"{result['steps']} guided steps), {prior_tflop:.4g} TFLOP prior ({result['prior_steps']} steps)",
        "peak GPU memory: "
        + ", ".join(f"batch {r['batch_size']} {r['peak_gpu_memory_gib'] or 'n/a'} GiB" for r in result["batches"]),
        f"speedup over Combined: {result['decoder_only_speedup_vs_combined']:.2f}x decoder GPU alone, "
        f"{result['speedup_vs_combined']:.2f}x with the prior's seconds added "
        f"(Combined {result['combined_images_per_s']:.3f} images/s)",
        f"prior seconds per image: {result['prior_seconds_per_image']:.4f}; decoder seconds per image: "
        f"{result['decoder_seconds_per_image']:.4f} (what the layout planner needs)",
        "channels-last x compile at batch "
        + ", ".join(
            f"{'cl' if r['channels_last'] else 'nchw'}/{'compiled' if r['compile'] else 'eager'} "
            f"{r['speedup_vs_eager']:.2f}x (ready {r['ready_s']} s, "
            f"max diff {r.get('max_level_difference_vs_eager', '?')} levels)"
            for r in result["matrix"]
        ),
        f"layout for 8 GPUs: {result['eight_gpus']['flags']} -> {result['eight_gpus']['images_per_s']} images/s",
    ]
    for line in lines:
        print(f"summary: {line}", flush=True)


def add_arguments(gpu: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark gpu``."""
    gpu.add_argument("--device", help="torch device (default: cuda)")
    gpu.add_argument("--tiny", action="store_true", help="tiny test models instead of real-size ones (dry run)")
    gpu.add_argument("--models", help="checkpoints to use (DIR/prior, DIR/decoder), e.g. the real weights")
    gpu.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="timed dtype")
    gpu.add_argument("--size", type=int, default=768, help="height and width")
    gpu.add_argument("--steps", type=int, default=50, help="decoder steps")
    gpu.add_argument("--prior-steps", type=int, default=25, help="prior steps")
    gpu.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], help="decoder batch sizes (eager)")
    gpu.add_argument("--matrix-batch", type=int, default=16, help="batch size of the channels-last x compile runs")
    gpu.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="compiled runs (auto: on CUDA)")
    gpu.add_argument("--timed-batches", type=int, default=3, help="most timed decoder calls per run")
    gpu.add_argument("--combined-rows", type=int, default=3, help="most timed Combined pipeline rows")
    gpu.add_argument("--check-rows", type=int, default=2, help="rows rendered for the float32/float16 check")
    gpu.add_argument("--check-steps", type=int, default=10, help="prior and decoder steps of the check")
    gpu.add_argument(
        "--budget-s", type=float, default=450, help="wall seconds for the whole run; timed calls are trimmed to fit"
    )
    gpu.add_argument(
        "--peak-tflops", type=float, help="the device's dense fp16 peak (default: known for H100/H200/A100)"
    )
    gpu.add_argument("--min-free-gpu-gib", type=float, default=40, help="refuse with less free GPU memory")
    gpu.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    gpu.add_argument(
        "--work-dir", help="where checkpoints go (default: /dev/shm, else the temporary folder, with room)"
    )


MODES = (
    Mode(
        name="gpu",
        help="decoder images/s per GPU, fraction of peak, compile x channels-last, vs the Combined pipeline",
        add_arguments=add_arguments,
        run=run_gpu,
        quiet_libraries=True,
    ),
)
