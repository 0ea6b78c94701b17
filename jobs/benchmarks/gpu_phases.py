"""``benchmark gpu``'s phases: the runner that budgets, measures and prints each one, and the timed phases (decoder
runs, diffusers' Combined loop, the prior)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.benchmarks.gpu_checks import (
    GIB,
    Budget,
    Deadline,
    counting_syncs,
    pixels_of,
    release,
    synchronize,
    time_calls,
)

OK, SKIPPED, ERROR = "ok", "skipped", "error"


class PhaseRunner:
    """Runs phases one after another: each only if the budget affords its estimate, each measured for GPU memory
    above what was allocated before it (the models actors share released first), each printed as one JSON line
    when it ends, whatever happened (a killed run keeps the lines it printed). A phase that raises is recorded
    with its error and the run goes on; after an interrupt (the `Deadline`, Ctrl-C) the remaining phases are
    skipped."""

    def __init__(self, budget: Budget, *, device: str, reserve_s: float, deadline: Deadline | None = None) -> None:
        self.budget, self.device, self.reserve_s, self.deadline = budget, device, reserve_s, deadline
        self.records: dict[str, dict[str, Any]] = {}
        self.stopped: str | None = None

    def ok(self, name: str) -> dict[str, Any] | None:
        """The record of phase ``name`` if it ran without error."""
        record = self.records.get(name)
        return record if record is not None and record["status"] == OK else None

    def run(
        self, name: str, phase: Callable[[], dict[str, Any]], *, estimate_s: float = 0.0, skip: str | None = None
    ) -> dict[str, Any]:
        """Phase ``name``: skipped (with ``skip`` as the reason, or the budget's) or run; printed; returned."""
        record: dict[str, Any] = {"phase": name, "index": len(self.records)}
        if skip is None and self.stopped:
            skip = f"the run was stopped ({self.stopped})"
        if skip is None:
            left = self.budget.left() - self.reserve_s
            if left < estimate_s:
                skip = f"budget: needs ~{estimate_s:.0f} s, {max(left, 0.0):.0f} s left before the summary"
        if skip is not None:
            record.update(status=SKIPPED, reason=skip)
        else:
            record.update(estimate_s=round(estimate_s, 1), **self._measured(phase))
        record["budget_used_s"] = round(self.budget.used(), 1)
        self.records[name] = record
        print(json.dumps(record, sort_keys=True, default=str), flush=True)
        return record

    def _measured(self, phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        import torch

        cuda = self.device.startswith("cuda")
        release(self.device)
        baseline = 0
        if cuda:
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        started = self.budget.clock()
        try:
            record = {"status": OK, **phase()}
        except KeyboardInterrupt:
            record = {"status": ERROR, "error": f"stopped: {self.stop()}"}
        except Exception as exc:  # one failing phase must not cost the others their figures
            where = traceback.extract_tb(exc.__traceback__)[-1]
            message = " ".join(str(exc).split())[:500]
            record = {
                "status": ERROR,
                "error": f"{type(exc).__name__}: {message}",
                "where": f"{where.filename}:{where.lineno}",
            }
            print(f"phase failed: {record['error']}", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
        record["seconds"] = round(self.budget.clock() - started, 2)
        try:
            if cuda:
                record["baseline_gpu_memory_gib"] = round(baseline / GIB, 2)
                record["peak_gpu_memory_gib"] = round((torch.cuda.max_memory_allocated() - baseline) / GIB, 2)
            release(self.device)
            if cuda:
                record["left_allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        except KeyboardInterrupt:  # the phase's figures stand; what comes after it does not run
            self.stop()
        return record

    def stop(self) -> str:
        """After an interrupt: why the run stops (the `Deadline`, else Ctrl-C)."""
        fired = self.deadline is not None and self.deadline.fired
        self.stopped = self.stopped or ("the hard deadline of --budget-s passed" if fired else "interrupted")
        return self.stopped


@dataclass(kw_only=True)
class Bench:
    """What the phases share: the options, the models, the rows, and what earlier phases found."""

    args: argparse.Namespace
    device: str
    work_dir: Path
    budget: Budget
    reserve_s: float
    peak: float | None
    models: str = ""  # set by the models phase, with the decoder's FLOPs per image
    decoder_flops: float = 0.0
    work: pa.Table | None = None  # manifest rows, as the prior takes them
    embeds: pa.Table | None = None  # the same rows with seeded random embeddings, as the decoder takes them
    pixels: dict[str, list[np.ndarray | None]] = field(default_factory=dict)  # warm-up images by phase
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # the phases' records (`PhaseRunner.records`)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        synchronize(self.device)

    def rows(self) -> None:
        """The manifest rows every timed phase takes its calls from (``--batch-size`` x (``--timed-batches`` + 1))."""
        from jobs.benchmarks.common import write_manifest
        from jobs.benchmarks.score import with_random_embeddings
        from jobs.planning.run_plan import manifest_work
        from schemas.config import JobConfig
        from schemas.models import ModelPaths

        args = self.args
        num_rows = args.batch_size * (args.timed_batches + 1)
        manifest = write_manifest(
            self.work_dir / "manifest.parquet",
            num_rows=num_rows,
            size=args.size,
            steps=args.steps,
            prior_steps=args.prior_steps,
        )
        paths = ModelPaths.resolve(models_dir=self.models)
        config = JobConfig(
            manifest=manifest, output=str(self.work_dir / "ours"), models=paths, batch_size=args.batch_size
        )
        self.work = manifest_work(config).batches.work
        unet = json.loads(Path(self.models, "decoder", "unet", "config.json").read_text())
        self.embeds = with_random_embeddings(self.work, dim=int(unet["encoder_hid_dim"]))

    def decoder_phase(self, name: str, *, batch: int, channels_last: bool, compile: bool) -> dict[str, Any]:
        """`DecoderActor` on the decoder checkpoint, ``batch`` rows of random embeddings per call: a warm-up call (a
        compiled actor compiles its one shape there: no warm-up list, so no other shapes), then timed calls."""
        from actors.decoder import DecoderActor
        from schemas.accel import AccelOptions

        clock, args = self.budget.clock, self.args
        started = clock()
        decoder = DecoderActor(
            {"text2img": f"{self.models}/decoder"},
            dtype=args.dtype,
            device=self.device,
            accel=AccelOptions(channels_last=channels_last, compile=compile),
            max_batch_size=batch,
        )
        ready_s = clock() - started
        calls = max(self.embeds.num_rows // batch, 1)
        eager = self.seconds_per_image()
        timing = time_calls(
            lambda k: decoder(self.embeds.slice(batch * (k % calls), batch)),
            max_calls=args.timed_batches,
            budget=self.budget,
            keep=self.reserve_s,
            sync=self.sync,
            estimate=batch * eager if compile and eager else None,
            count_syncs=lambda: counting_syncs(self.device),
        )
        _raise_row_error(timing.first)
        self.pixels[name] = [pixels_of(r) if r["error"] is None else None for r in timing.first.to_pylist()]
        per_call = timing.per_call()
        figure: dict[str, Any] = {
            "batch_size": batch,
            "channels_last": channels_last,
            "compile": compile,
            "ready_s": round(ready_s, 2),
            "warm_up_s": round(timing.warm_up_s, 2),
            "timed_calls": len(timing.seconds),
            "call_seconds": [round(s, 3) for s in timing.seconds],
            "decoder_images_per_s": round(batch / per_call, 4),
            "decoder_seconds_per_image": round(per_call / batch, 5),
            "calls_with_errors": sum(t.column("error").null_count != t.num_rows for t in timing.outputs),
            "syncs_per_call": timing.syncs.count,
            "syncs_per_step": None if timing.syncs.count is None else round(timing.syncs.count / args.steps, 3),
            "sync_sites": timing.syncs.sites,
        }
        if compile:
            figure["compiled"] = bool(decoder.compiled)  # False: compiling failed and the actor ran eagerly
            figure["compile_s"] = round(max(timing.warm_up_s - per_call, 0.0), 1)
        if self.peak:
            figure["fraction_of_peak"] = round(
                figure["decoder_images_per_s"] * self.decoder_flops / (self.peak * 1e12), 4
            )
        figure.update(self._versus_eager(name))
        what = f"{name}: batch {batch}{', channels-last' if channels_last else ''}{', compiled' if compile else ''}"
        print(f"{what}: {figure['decoder_images_per_s']:.3f} images/s ({len(timing.seconds)} timed calls)", flush=True)
        return figure

    def seconds_per_image(self, phase: str = "eager") -> float | None:
        """A decoder phase's seconds per image (None: it has not run)."""
        record = self.records.get(phase, {})
        return record.get("decoder_seconds_per_image") if record.get("status") == OK else None

    def _versus_eager(self, name: str) -> dict[str, Any]:
        """The largest level difference of phase ``name``'s warm-up images from the eager phase's (the same rows)."""
        eager, mine = self.pixels.get("eager"), self.pixels.get(name)
        if name == "eager" or not eager or not mine or len(eager) != len(mine):
            return {}
        pairs = [(a, b) for a, b in zip(mine, eager) if a is not None and b is not None]
        if not pairs:
            return {}
        return {"max_level_difference_vs_eager": max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in pairs)}

    def combined_phase(self) -> dict[str, Any]:
        """diffusers' `KandinskyV22CombinedPipeline`, one row per call as a user would loop over a manifest (PIL images
        out, not saved): the baseline of the speed-up."""
        import torch

        from jobs.dev.reference import combined_pipeline

        clock, args = self.budget.clock, self.args
        started = clock()
        pipe = combined_pipeline(self.models, dtype=getattr(torch, args.dtype), device=self.device)
        load_s = clock() - started
        steps = {"num_inference_steps": args.steps, "prior_num_inference_steps": args.prior_steps}

        def combined(k: int) -> Any:
            generator = torch.Generator("cpu").manual_seed(k)
            size = {"height": args.size, "width": args.size}
            return pipe(prompt=f"a red fox number {k}", generator=generator, **size, **steps).images[0]

        timing = time_calls(
            combined, max_calls=args.combined_rows, budget=self.budget, keep=self.reserve_s, sync=self.sync
        )
        rate = 1 / timing.per_call()
        print(f"combined: diffusers Combined, 1 row per call: {rate:.3f} images/s", flush=True)
        return {
            "load_s": round(load_s, 2),
            "warm_up_s": round(timing.warm_up_s, 2),
            "timed_calls": len(timing.seconds),
            "call_seconds": [round(s, 3) for s in timing.seconds],
            "combined_images_per_s": round(rate, 4),
        }

    def prior_phase(self) -> dict[str, Any]:
        """`PriorActor` at ``--batch-size`` rows per call: the prior's seconds per image (the layout planner's input)
        and its host syncs per call."""
        from actors.prior import PriorActor
        from schemas.accel import AccelOptions

        clock, args, batch = self.budget.clock, self.args, self.args.batch_size
        started = clock()
        prior = PriorActor(
            f"{self.models}/prior",
            dtype=args.dtype,
            device=self.device,
            accel=AccelOptions(channels_last=False),
            max_batch_size=batch,
        )
        ready_s = clock() - started
        calls = max(self.work.num_rows // batch, 1)
        timing = time_calls(
            lambda k: prior(self.work.slice(batch * (k % calls), batch)),
            max_calls=args.timed_batches,
            budget=self.budget,
            keep=self.reserve_s,
            sync=self.sync,
            count_syncs=lambda: counting_syncs(self.device),
        )
        _raise_row_error(timing.first)
        seconds = timing.per_call() / batch
        print(f"prior: batch {batch}: {seconds * 1000:.1f} ms per image", flush=True)
        return {
            "batch_size": batch,
            "ready_s": round(ready_s, 2),
            "warm_up_s": round(timing.warm_up_s, 2),
            "timed_calls": len(timing.seconds),
            "prior_seconds_per_image": round(seconds, 5),
            "syncs_per_call": timing.syncs.count,
            "sync_sites": timing.syncs.sites,
        }


def _raise_row_error(table: pa.Table) -> None:
    """A warm-up call whose rows failed makes every figure of its phase meaningless: raise its first error."""
    failed = [(k, e) for k, e in zip(table.column("error_kind").to_pylist(), table.column("error").to_pylist()) if e]
    if failed:
        kind, message = failed[0]
        raise RuntimeError(f"{len(failed)} of {table.num_rows} rows failed, the first with {kind}: {message[:300]}")
