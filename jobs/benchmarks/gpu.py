"""Mode ``gpu``: one unattended run on a GPU machine (BENCHMARKS.md e): decoder images/s and fraction of peak eager,
compiled and channels-last, diffusers' Combined loop as the baseline, the prior, equality, small batches and a CLIP
actor beside a decoder; one JSON line per phase, the summary last, all within ``--budget-s``."""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from cluster.layout import COLOCATION_EFFICIENCY, StageCosts, choose
from jobs.benchmarks.common import Mode, machine
from jobs.benchmarks.gpu_checks import Budget, Deadline, FakeClock, peak_tflops, preflight
from jobs.benchmarks.gpu_colocated import co_located_phase
from jobs.benchmarks.gpu_equality import equality_check
from jobs.benchmarks.gpu_phases import OK, Bench, PhaseRunner

GOAL_FRACTION_OF_PEAK = 0.5
GOAL_SPEEDUP = 2.5
RESERVE_S = 15.0  # kept for the summary and removing the scratch weights (at most 5% of a small budget)
DEADLINE_MARGIN_S = 5.0  # the hard deadline: this long before the budget ends
DECODER_PHASES = ("eager", "compiled", "compiled_channels_last", "channels_last")


def layout_for(num_gpus: int, *, prior_seconds: float, decoder_seconds: float) -> dict[str, Any]:
    """The layout `cluster.layout.choose` picks for ``num_gpus`` GPUs at these busy seconds per image."""
    costs = StageCosts(prior=prior_seconds, decoder=decoder_seconds, source="measured by this benchmark")
    chosen = choose(num_gpus=num_gpus, costs=costs)
    return {"flags": chosen.flags(), "images_per_s": round(chosen.images_per_s, 3), "note": chosen.note}


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``gpu`` (see BENCHMARKS.md e). Refuses (ValueError) without CUDA unless ``--device cpu --tiny``; the
    scratch folder it makes (weights included) is removed at the end, whatever happened."""
    import torch

    budget = Budget(args.budget_s, clock=FakeClock(args.clock_step) if args.clock_step else time.monotonic)
    device = args.device or "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    checks = preflight(args, device=device)
    try:
        for line in checks.lines:
            print(f"pre-flight: {line}", flush=True)
        result = _run(args, budget=budget, device=device, work_dir=checks.work_dir)
    finally:
        if checks.created:
            shutil.rmtree(checks.work_dir, ignore_errors=True)
    result["work_dir"], result["work_dir_removed"] = str(checks.work_dir), not checks.work_dir.exists()
    return result


def _run(args: argparse.Namespace, *, budget: Budget, device: str, work_dir: Any) -> dict[str, Any]:
    import torch

    cuda = device.startswith("cuda")
    if cuda:  # for every phase, the Combined baseline included (each actor would set it; diffusers does not)
        torch.backends.cudnn.benchmark = True
    name = args.device_name or (torch.cuda.get_device_name(torch.device(device)) if cuda else device)
    peak, accelerator = peak_tflops(name, args.peak_tflops)
    reserve = min(RESERVE_S, 0.05 * args.budget_s)
    deadline = Deadline(budget.left() - DEADLINE_MARGIN_S) if cuda and not args.clock_step else None
    runner = PhaseRunner(budget, device=device, reserve_s=reserve, deadline=deadline)
    bench = Bench(args=args, device=device, work_dir=work_dir, budget=budget, reserve_s=reserve, peak=peak)
    bench.records = runner.records
    try:
        for phase, run, estimate, skip in _plan(bench, runner):
            try:
                reason = skip()
                runner.run(phase, run, estimate_s=0.0 if reason else estimate(), skip=reason)
            except KeyboardInterrupt:  # between phases: the rest are skipped, the summary still comes
                runner.stop()
                if phase not in runner.records:
                    runner.run(phase, run, skip=f"the run was stopped ({runner.stopped})")
    finally:
        if deadline is not None:
            deadline.cancel()
    result = _summary(bench, runner, device_name=name, accelerator=accelerator)
    _print_summary(result)
    return result


def _plan(bench: Bench, runner: PhaseRunner) -> list[tuple]:
    """(name, phase, estimate, skip reason) of every phase, in order. Estimates (seconds: loading, warm-up and one
    timed call) and skip reasons are read when the phase's turn comes, from what the phases before it measured.

    The order puts first what the goals need: the eager batch (the decoder's images/s), then diffusers' Combined
    loop and the prior (the speed-up and the layout's input: cheap and predictable, so they come before the one
    phase that can take minutes), then compiling (its cold compile may use most of what is left)."""
    args, ok = bench.args, runner.ok
    batch = args.batch_size

    def eager(key: str, default: float = 0.0) -> float:
        return (ok("eager") or {}).get(key, default)

    def ready(phase: str, key: str = "ready_s") -> float:
        return (ok(phase) or {}).get(key, 3 * eager("ready_s"))

    per_image = lambda: eager("decoder_seconds_per_image")  # noqa: E731
    call = lambda: batch * per_image()  # noqa: E731

    def compile_s() -> float:
        compiled = ok("compiled")
        measured = compiled and compiled.get("compiled") and compiled["compile_s"]
        return 1.2 * measured if measured else args.compile_estimate_s  # channels-last compiles its own graphs

    no_models = lambda: None if ok("models") else "no models: the models phase did not finish"  # noqa: E731
    compile_on = bench.cuda if args.compile == "auto" else args.compile == "on"
    no_compile = "--compile off" if args.compile == "off" else "compile runs on CUDA only (--compile on forces it)"

    def compile_skip() -> str | None:
        return no_models() or (None if compile_on else no_compile)

    plan = [
        ("models", lambda: _models_phase(bench), lambda: 0.0, lambda: None),
        (
            "eager",
            lambda: bench.decoder_phase("eager", batch=batch, channels_last=False, compile=False),
            lambda: 0.0,
            no_models,
        ),
        ("combined", bench.combined_phase, lambda: 4 * eager("ready_s") + 3 * 2 * per_image(), no_models),
        ("prior", bench.prior_phase, lambda: 3 * eager("ready_s") + 2 * 0.2 * call(), no_models),
        (
            "compiled",
            lambda: bench.decoder_phase("compiled", batch=batch, channels_last=False, compile=True),
            lambda: eager("ready_s") + args.compile_estimate_s + 2 * call(),
            compile_skip,
        ),
        (
            "compiled_channels_last",
            lambda: bench.decoder_phase("compiled_channels_last", batch=batch, channels_last=True, compile=True),
            lambda: eager("ready_s") + compile_s() + 2 * call(),
            compile_skip,
        ),
        (
            "channels_last",
            lambda: bench.decoder_phase("channels_last", batch=batch, channels_last=True, compile=False),
            lambda: eager("ready_s") + 2 * call(),
            no_models,
        ),
        (
            "equality",
            lambda: equality_check(args, models=bench.models, device=bench.device, work_dir=bench.work_dir),
            lambda: 2 * ready("combined", "load_s") + 2 * ready("prior") + args.check_rows * 20 * per_image(),
            lambda: no_models() or ("--check-rows 0" if args.check_rows <= 0 else None),
        ),
    ]
    for small in args.small_batches:
        plan.append(
            (
                f"eager_batch_{small}",
                lambda small=small: bench.decoder_phase(
                    f"eager_batch_{small}", batch=small, channels_last=False, compile=False
                ),
                lambda small=small: eager("ready_s") + 4 * small * per_image(),
                no_models,
            )
        )
    plan.append(
        (
            "co_located",
            lambda: co_located_phase(bench),
            lambda: ready("prior") + eager("ready_s") + (2 * args.colocated_calls + 2) * 1.2 * call(),
            no_models,
        )
    )
    return plan


def _models_phase(bench: Bench) -> dict[str, Any]:
    """The checkpoints (``--models``, the tiny models, or real-size random weights written in fp16), their FLOPs per
    image, and the rows every phase takes its calls from."""
    from jobs.dev.flops import image_flops
    from jobs.dev.real_size import build_real_size_models
    from jobs.dev.tiny_models import build_tiny_models

    args = bench.args
    if args.models:
        models, kind = args.models, args.models
    elif args.tiny:
        models, kind = str(bench.work_dir / "models"), "tiny"
        build_tiny_models(models)
    else:
        models, kind = (
            build_real_size_models(bench.work_dir / "models", device=bench.device),
            "real-size, random weights",
        )
    flops = image_flops(models, height=args.size, width=args.size, steps=args.steps, prior_steps=args.prior_steps)
    bench.models, bench.decoder_flops = models, flops.decoder
    bench.rows()
    print(f"models: {kind}, {flops.decoder / 1e12:.4g} TFLOP per image in the decoder", flush=True)
    return {
        "models": kind,
        "flops_per_image": {
            "decoder": flops.decoder,
            "unet_step": flops.unet_step,
            "movq": flops.movq,
            "prior": flops.prior,
        },
    }


def _summary(bench: Bench, runner: PhaseRunner, *, device_name: str, accelerator: str | None) -> dict[str, Any]:
    """Every phase's status and the figures the goals are judged by, from the phases that ran."""
    args, ok, records = bench.args, runner.ok, runner.records
    runs = {name: r for name, r in records.items() if r["status"] == OK and "decoder_images_per_s" in r}
    best_name = max(runs, key=lambda name: runs[name]["decoder_images_per_s"]) if runs else None
    best = runs.get(best_name, {})
    combined = (ok("combined") or {}).get("combined_images_per_s")
    prior_s = (ok("prior") or {}).get("prior_seconds_per_image")
    measured = (ok("co_located") or {}).get("efficiency")
    efficiency = min(measured or COLOCATION_EFFICIENCY, 1.0)  # overlap beyond 1 is not counted on
    decoder_s = 1 / best["decoder_images_per_s"] if best else None
    per_gpu = efficiency / (decoder_s + prior_s) if decoder_s and prior_s is not None else None
    speedup = round(per_gpu / combined, 3) if per_gpu and combined else None
    fraction = best.get("fraction_of_peak")
    result: dict[str, Any] = {
        "phase": "summary",
        "mode": "gpu",
        "machine": {**machine(), "device": device_name},
        "accelerator": accelerator,
        "peak_tflops": bench.peak,
        "models": (ok("models") or {}).get("models"),
        "size": args.size,
        "steps": args.steps,
        "prior_steps": args.prior_steps,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "budget_s": args.budget_s,
        "seconds": round(bench.budget.used(), 1),
        "cudnn_benchmark": bench.cuda,
        "phases": [[name, r["status"]] for name, r in records.items()],
        "stopped": runner.stopped,
        "flops_per_image": (ok("models") or {}).get("flops_per_image"),
        "combined_images_per_s": combined,
        "best": {k: best.get(k) for k in ("batch_size", "channels_last", "compile", "compiled", "decoder_images_per_s")}
        | {"phase": best_name, "fraction_of_peak": fraction},
        "decoder_seconds_per_image": round(decoder_s, 5) if decoder_s else None,
        "prior_seconds_per_image": prior_s,
        "decoder_only_speedup_vs_combined": round(best["decoder_images_per_s"] / combined, 3)
        if best and combined
        else None,
        "co_location_efficiency": {"measured": measured, "layout_constant": COLOCATION_EFFICIENCY},
        "images_per_s_per_gpu": round(per_gpu, 4) if per_gpu else None,
        "speedup_vs_combined": speedup,
        "speedup_note": "prior and decoder on one GPU: co-location efficiency / (decoder + prior seconds per image), "
        "the efficiency measured by the co_located phase (at most 1), else the layout's constant",
        "syncs_per_step": {name: r.get("syncs_per_step") for name, r in runs.items()},
        "peak_gpu_memory_gib": {
            name: r["peak_gpu_memory_gib"] for name, r in records.items() if r.get("peak_gpu_memory_gib") is not None
        },
        "speedup_vs_eager": {
            name: round(r["decoder_images_per_s"] / runs["eager"]["decoder_images_per_s"], 3)
            for name, r in runs.items()
            if "eager" in runs and name in DECODER_PHASES
        },
        "equality": {k: v for k, v in (ok("equality") or {}).items() if k.startswith(("check_", "vs_"))},
        "goals": {
            "fraction_of_peak": {
                "target": GOAL_FRACTION_OF_PEAK,
                "measured": fraction,
                "met": None if fraction is None else fraction >= GOAL_FRACTION_OF_PEAK,
            },
            "speedup_vs_combined": {
                "target": GOAL_SPEEDUP,
                "measured": speedup,
                "met": None if speedup is None else speedup >= GOAL_SPEEDUP,
            },
        },
    }
    if decoder_s and prior_s is not None:
        result["eight_gpus"] = layout_for(8, prior_seconds=prior_s, decoder_seconds=decoder_s)
    return result


def _print_summary(result: dict[str, Any]) -> None:
    """One line per figure, for the note that quotes this run."""
    best, goals = result["best"], result["goals"]
    lines = [
        "phases: " + ", ".join(f"{name} {status}" for name, status in result["phases"]),
        f"decoder images/s per GPU: {best['decoder_images_per_s']} ({best['phase']}, batch {best['batch_size']})",
        f"fraction of peak: {goals['fraction_of_peak']['measured']} of {result['peak_tflops']} TFLOP/s "
        f"({result['accelerator'] or 'type unknown: pass --peak-tflops'}; target {GOAL_FRACTION_OF_PEAK})",
        f"speed-up over Combined ({result['combined_images_per_s']} images/s): {result['speedup_vs_combined']} "
        f"with the prior on the same GPU, {result['decoder_only_speedup_vs_combined']} decoder alone "
        f"(target {GOAL_SPEEDUP})",
        f"prior / decoder seconds per image: {result['prior_seconds_per_image']} / "
        f"{result['decoder_seconds_per_image']}",
        f"host syncs per decoder step: {result['syncs_per_step']} (target 0)",
        f"co-location efficiency: {result['co_location_efficiency']['measured']} measured, "
        f"{COLOCATION_EFFICIENCY} assumed by cluster/layout.py",
        f"peak GPU memory per phase, GiB above what was allocated before it: {result['peak_gpu_memory_gib']}",
        f"seconds: {result['seconds']} of {result['budget_s']:g}",
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
    gpu.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="rows per call of the eager, compiled, channels-last, prior and co-located phases",
    )
    gpu.add_argument(
        "--small-batches", type=int, nargs="*", default=[1, 4], help="batch sizes of the late eager phases"
    )
    gpu.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="compiled phases (auto: on CUDA)")
    gpu.add_argument(
        "--compile-estimate-s",
        type=float,
        default=240,
        help="a cold compile's expected seconds: a compiled phase starts only if it fits the budget",
    )
    gpu.add_argument("--timed-batches", type=int, default=2, help="most timed calls per phase, after its warm-up")
    gpu.add_argument("--combined-rows", type=int, default=3, help="most timed Combined pipeline rows")
    gpu.add_argument("--check-rows", type=int, default=2, help="rows rendered for the float32/float16 check")
    gpu.add_argument("--check-steps", type=int, default=10, help="prior and decoder steps of the check")
    gpu.add_argument("--colocated-calls", type=int, default=2, help="decoder calls per co-located measurement")
    gpu.add_argument(
        "--budget-s",
        type=float,
        default=480,
        help="wall seconds for the whole run: phases that do not "
        "fit are skipped, timed calls trimmed, and a phase still running 5 s before the end is stopped",
    )
    gpu.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's dense fp16 peak (default: cluster/defaults.py's for the device's type)",
    )
    gpu.add_argument("--device-name", help="read the peak for this device name instead of torch's (dry runs)")
    gpu.add_argument("--min-free-gpu-gib", type=float, default=40, help="refuse with less free GPU memory")
    gpu.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    gpu.add_argument(
        "--work-dir",
        help="where checkpoints go, kept (default: a scratch folder in /dev/shm, else the "
        "temporary folder, with room; removed at the end)",
    )
    gpu.add_argument("--clock-step", type=float, help=argparse.SUPPRESS)  # tests: a fake clock, this many s per reading


MODES = (
    Mode(
        name="gpu",
        help="decoder images/s per GPU, fraction of peak, compiled and channels-last, vs the Combined pipeline; "
        "one JSON line per phase",
        add_arguments=add_arguments,
        run=run_gpu,
        quiet_libraries=True,
    ),
)
