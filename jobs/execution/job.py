"""The render job: plan, stream batches through the prior and decoder stages, record results.

Two runners execute the same stage classes: ``ray`` (Ray actor pools pinned to GPUs, the
production path) and ``local`` (in-process, one batch after another: for debugging and for tests
that compare the two).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from actors.storage import Storage
from cluster.resources import StagePlan, fit_cpus, place_stages, resolve_stages, suggest_stages
from jobs.execution.runner import StageSpec, connect_ray, run_local, run_ray
from jobs.output.lease import Lease
from jobs.output.results import ResultsWriter, final_results, read_results
from jobs.planning.plan import Plan, group_batches, make_plan, prior_batch_size
from jobs.reporting.gallery import busy_seconds, write_report
from jobs.reporting.progress import Progress
from jobs.reporting.stats import summarize, versions, write_stats
from schemas.config import JobConfig
from schemas.keys import IMAGES_DIR, RESULTS_DIR, STATS_FILE, SUCCESS_FILE
from schemas.modes import MODES
from schemas.results import STATUS_OK, result_from_work, results_table
from schemas.versions import version_mismatches

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class JobSummary:
    """What `run_job` returns: the run id, the plan and the stats written to ``stats.json``."""

    run_id: str
    plan: Plan
    stats: dict[str, Any]


def new_run_id() -> str:
    """Sortable, unique run id: UTC timestamp plus 8 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def decoder_models(config: JobConfig, plan: Plan) -> dict[str, str]:
    """mode -> checkpoint path for the modes this run renders (only those load)."""
    return {mode: config.models.for_checkpoint(MODES[mode].checkpoint) for mode in plan.modes}


def plan_job(config: JobConfig, storage: Storage) -> Plan:
    """The plan of a run on ``storage`` as it is now: images already final there are skipped."""
    previous = final_results(read_results(storage, columns=["id", "image_index", "status", "finished_at"]))
    done = previous.filter(pc.equal(previous.column("status"), STATUS_OK)) if previous.num_rows else previous
    return make_plan(config, done=done if config.retry_errors else previous)


def run_job(config: JobConfig, *, progress: Progress | None = None) -> JobSummary:
    """Render every image of the manifests that is not final in the output yet; see README.md.

    Raises `schemas.manifest.ManifestError` (before any model loads) for malformed manifests,
    ValueError for impossible settings and `jobs.output.lease.LeaseHeldError` when another run holds the
    output. Results rows are published only after their images.
    ``progress`` is told about every results table as it is published (default: a quiet one).
    """
    for line in version_mismatches():  # the actors log their own workers' mismatches at start-up
        logger.warning("untested package version: %s", line)
    progress = progress or Progress(live=False)
    started = time.monotonic()
    storage = Storage(config.output, storage_options=config.storage_options)
    run_id = new_run_id()
    with Lease(storage, run_id=run_id, ttl_s=config.lease_ttl_s, wait_s=config.lease_wait_s) as lease:
        if config.overwrite:
            for key in (SUCCESS_FILE, STATS_FILE, RESULTS_DIR, IMAGES_DIR):
                storage.delete(key)
        plan = plan_job(config, storage)
        logger.info(
            "run %s: %d rows in %d file(s), %d images, %d already final, %d to render in %d batches, %d refused",
            run_id,
            plan.num_rows,
            len(plan.files),
            plan.num_images,
            plan.num_done,
            plan.num_to_render,
            len(plan.batches),
            plan.refused.num_rows,
        )
        storage.delete(SUCCESS_FILE)
        writer = ResultsWriter(
            storage, run_id=run_id, flush_rows=config.results_flush_rows, flush_seconds=config.results_flush_seconds
        )
        num_errors = plan.refused.num_rows
        progress.start(run_id=run_id, num_images=plan.num_to_render, num_refused=plan.refused.num_rows)
        if plan.refused.num_rows:
            writer.add(
                results_table(
                    [
                        result_from_work(row, run_id=run_id, error=row["error"], error_kind=row["error_kind"])
                        for row in plan.refused.to_pylist()
                    ]
                )
            )
        stage_info: dict[str, Any] = {}
        num_rendered = 0
        render_started = time.monotonic()
        if plan.batches:
            for results in execute(plan, config, run_id=run_id, stage_info=stage_info):
                if lease.lost.is_set():
                    raise LeaseLostError(f"run {run_id} lost the lease on {config.output}; stopping")
                writer.add(results)
                num_rendered += results.num_rows
                num_errors += pc.sum(pc.not_equal(results.column("status"), STATUS_OK)).as_py() or 0
                progress.update(results)
        writer.close()
        progress.finish()
        render_seconds = time.monotonic() - render_started

        every_run = read_results(storage)
        this_run = every_run.filter(pc.equal(every_run.column("run_id"), run_id))
        final = final_results(every_run)
        num_this_run = num_rendered + plan.refused.num_rows
        stats = {
            "run_id": run_id,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "manifest_files": plan.files,
            "num_rows": plan.num_rows,
            "num_images_requested": plan.num_images,
            "num_skipped_already_final": plan.num_done,
            "num_refused": plan.refused.num_rows,
            "num_rendered": num_rendered,
            "num_errors_this_run": num_errors,
            "error_fraction_this_run": round(num_errors / num_this_run, 6) if num_this_run else 0.0,
            "render_seconds": round(render_seconds, 3),
            "images_per_s": round(num_rendered / render_seconds, 3) if render_seconds > 0 and num_rendered else 0.0,
            "wall_seconds": round(time.monotonic() - started, 3),
            "output": summarize(final),
            "this_run": summarize(final_results(this_run)),  # an image a retried batch wrote twice counts once
            "busy_seconds": busy_seconds(this_run),
            "stages": stage_info,
            "suggested_stages": _suggest(this_run, cluster_gpus=stage_info.get("cluster_gpus", 0.0)),
            "versions": versions(),
            "config": config.to_dict(),
        }
        stats["report"] = write_report(storage, final, stats=stats)
        write_stats(storage, stats)
        storage.write_bytes(SUCCESS_FILE, f"{run_id}\n".encode())
    return JobSummary(run_id=run_id, plan=plan, stats=stats)


class LeaseLostError(RuntimeError):
    """This run's lease was taken by another run (it expired while this run could not renew it)."""


def build_stages(config: JobConfig, plan: Plan, *, run_id: str, cluster_gpus: float) -> list[StageSpec]:
    """The stage chain this plan needs ([depth] -> prior -> decoder), resources resolved for ``cluster_gpus``."""
    from actors.decoder import DecoderActor
    from actors.depth import DepthActor
    from actors.prior import PriorActor

    prior, decoder, depth = resolve_stages(
        config.prior, config.decoder, cluster_gpus=cluster_gpus, depth=config.depth if plan.needs_depth else None
    )
    prior, decoder = place_stages(prior, decoder, stage_placement=config.stage_placement)
    inputs = {
        "storage_options": config.storage_options,
        "allowed_protocols": config.limits.allowed_protocols,
        "max_input_pixels": config.limits.max_input_pixels,
    }
    stages = []
    if depth is not None:
        depth_model = {"model": config.models.depth, "revision": config.models.depth_hub_revision()}
        stages.append(StageSpec(name="depth", cls=DepthActor, kwargs={**depth_model, **inputs}, resources=depth))
    stages.append(
        StageSpec(
            name="prior",
            cls=PriorActor,
            kwargs={"model": config.models.prior, "dtype": config.dtype, "accel": config.accel, **inputs},
            resources=prior,
            batch_size=prior_batch_size(config),
        )
    )
    stages.append(
        StageSpec(
            name="decoder",
            cls=DecoderActor,
            kwargs={
                "models": decoder_models(config, plan),
                "movq_scales": plan.movq_scales,
                "output": config.output,
                "run_id": run_id,
                "dtype": config.dtype,
                "accel": config.accel,
                **inputs,
            },
            resources=decoder,
            batch_size=config.batch_size,
        )
    )
    return stages


def work_groups(plan: Plan, config: JobConfig) -> Iterator[list[pa.Table]]:
    """The plan's decoder batches, grouped into prior calls (`jobs.planning.plan.group_batches`), lazily."""
    return group_batches(plan.batches, max_rows=prior_batch_size(config))


def execute(plan: Plan, config: JobConfig, *, run_id: str, stage_info: dict[str, Any]) -> Iterator[pa.Table]:
    """Run the plan's batches through the stages with the configured runner; yields results tables."""
    if config.runner == "local":
        stages = build_stages(config, plan, run_id=run_id, cluster_gpus=0.0)
        stage_info.update(runner="local", stages={spec.name: _describe(spec.resources) for spec in stages})
        yield from run_local(stages, work_groups(plan, config), split_after=_prior_index(stages))
        return
    import ray

    # The stage classes import torch, diffusers and transformers (seconds of CPU); Ray's start-up
    # mostly waits on its own processes, so the two overlap.
    preload = threading.Thread(target=_import_stage_modules, name="import-stages", daemon=True)
    preload.start()
    started = connect_ray(config.address)
    preload.join()
    try:
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        stages = build_stages(config, plan, run_id=run_id, cluster_gpus=cluster_gpus)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
        fitted = fit_cpus([spec.resources for spec in stages], cluster_cpus=cluster_cpus)
        if fitted != [spec.resources for spec in stages]:
            logger.warning(
                "the stages reserve more than the cluster's %g CPUs; CPU reservations scaled to %s",
                cluster_cpus,
                [fit.num_cpus for fit in fitted],
            )
            stages = [dataclasses.replace(spec, resources=fit) for spec, fit in zip(stages, fitted)]
        timeline: dict[str, Any] = {}
        stage_info.update(
            runner="ray", cluster_gpus=cluster_gpus, stages={spec.name: _describe(spec.resources) for spec in stages}
        )
        yield from run_ray(stages, work_groups(plan, config), split_after=_prior_index(stages), timeline=timeline)
        stage_info.update(_timing(timeline, [spec.name for spec in stages]))
    finally:
        if started:
            ray.shutdown()


def _import_stage_modules() -> None:
    """What the driver imports anyway: the stage classes (torch) and, for stats.json, diffusers and transformers."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    import actors.decoder  # noqa: F401
    import actors.depth  # noqa: F401
    import actors.prior  # noqa: F401


def _suggest(this_run: pa.Table, *, cluster_gpus: float) -> dict[str, Any] | None:
    """Stage layout suggested for this cluster from this run's measured per-image stage costs (ok rows)."""
    ok = this_run.filter(pc.equal(this_run.column("status"), STATUS_OK))
    busy = busy_seconds(ok)
    if not ok.num_rows or not busy["decoder"]:
        return None
    prior = busy["prior"] / ok.num_rows
    decoder = busy["decoder"] / ok.num_rows
    suggestion = suggest_stages(prior_seconds=prior, decoder_seconds=decoder, cluster_gpus=cluster_gpus)
    logger.info(
        "measured %.3g s/image prior, %.3g s/image decoder; for %g GPUs: %s (%s)",
        prior,
        decoder,
        cluster_gpus,
        suggestion.flags(),
        suggestion.note,
    )
    return {
        "prior_seconds_per_image": round(prior, 6),
        "decoder_seconds_per_image": round(decoder, 6),
        "cluster_gpus": cluster_gpus,
        **dataclasses.asdict(suggestion),
        "flags": suggestion.flags(),
    }


def _prior_index(stages: list[StageSpec]) -> int:
    """Stages up to the prior see whole groups (one prior call serves several decoder batches)."""
    return [spec.name for spec in stages].index("prior")


def _describe(stage: StagePlan) -> dict[str, Any]:
    described = {"num_actors": stage.num_actors, "num_gpus": stage.num_gpus, "num_cpus": stage.num_cpus}
    if not stage.placement.is_any:
        described["placement"] = dataclasses.asdict(stage.placement)
    return described


def _timing(timeline: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """stats.json's view of a runner timeline: seconds since start, busy seconds and calls per stage."""
    started = timeline["started"]
    marks = {
        f"{name}_s": round(timeline[name] - started, 3)
        for name in ("actors_ready", "first_dispatch", "first_result")
        if name in timeline
    }
    return {
        "timeline": marks,
        "busy_seconds": {name: round(s, 3) for name, s in zip(names, timeline["busy_seconds"])},
        "calls": dict(zip(names, timeline["calls"])),
    }
