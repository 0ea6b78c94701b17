"""The render job, top to bottom: take the output's lease, plan, execute, publish each shard, report.

One shard's trip: `jobs.planning` finds it pending and turns its rows into batches; `jobs.execution`
runs them through the stages, and its writer publishes the shard's data and results and returns a
`schemas.summary.PartSummary`; `jobs.publishing` writes the shard's marker from it (the shard is
done); `jobs.reporting` adds it to the run's stats. At the end: stats.json, the gallery, ``_SUCCESS``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Any

from actors.storage import Storage
from cluster.defaults import Machine
from jobs.execution.chain import ChainBuilder, decoder_dtype, execute, session, stage_gpus, start_imports
from jobs.execution.connect import check_address
from jobs.execution.contract import BatchDone, Task, TaskDone
from jobs.execution.metrics import MetricsRecorder
from jobs.execution.timeline import Timeline
from jobs.planning.availability import ModelUnavailableError, check_models, note_changed_checkpoints
from jobs.planning.batches import group_batches, prior_batch_size
from jobs.planning.duplicates import DuplicateImages
from jobs.planning.machine import log_choices, stats_record
from jobs.planning.pinning import check_pinned, settle
from jobs.planning.run_plan import RunPlan, ShardWork, plan_run, with_machine_defaults
from jobs.planning.scan import DEPTH_MODEL, PendingScan
from jobs.publishing.corrections import apply_corrections
from jobs.publishing.lease import Lease
from jobs.publishing.log import CompletionLog
from jobs.publishing.markers import new_marker, retried_marker, write_settings
from jobs.publishing.orphans import delete_orphans, delete_output, nothing_left_if_refused
from jobs.reporting.card import write_card
from jobs.reporting.gallery import write_report
from jobs.reporting.progress import Progress
from jobs.reporting.stats import last_render, run_stats, write_stats
from schemas.config import JobConfig
from schemas.keys import SUCCESS_FILE
from schemas.loggers import logger_for
from schemas.modes import MODES
from schemas.shards import FORMAT_FILES
from schemas.summary import Counts, PartSummary
from schemas.text import public_uri
from schemas.versions import unreported, version_mismatches
from schemas.work import to_ipc

logger = logger_for(__name__)


@dataclass(frozen=True, kw_only=True)
class JobSummary:
    """What `run_job` returns: the run id, the plan and the stats written to ``stats.json``."""

    run_id: str
    plan: RunPlan
    stats: dict[str, Any]


class LeaseLostError(RuntimeError):
    """This run's lease was taken by another run (it expired while this run could not renew it)."""


def new_run_id() -> str:
    """Sortable, unique run id: UTC timestamp plus 8 random hex digits."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def tasks(
    plan: RunPlan, config: JobConfig, open_works: dict[str, ShardWork], duplicates: DuplicateImages | None = None
) -> Iterator[Task]:
    """One task per pending shard (its part), planned only when the runner asks for it. A ``--retry-errors`` part
    with nothing to write (every error a refusal it would make again word for word) is no task: no empty part, no
    marker rewritten."""
    for shard in plan.works(duplicates):
        if shard.retried is not None and not shard.work.num_to_render and not shard.work.refused.num_rows:
            continue
        open_works[shard.part] = shard
        refused = to_ipc(shard.work.refused) if shard.work.refused.num_rows else None
        groups = list(group_batches(shard.work.batches, max_rows=prior_batch_size(config)))
        yield Task(tag=shard.part, groups=groups, args={"refused": refused})


def run_job(
    config: JobConfig,
    *,
    progress: Progress | None = None,
    build: ChainBuilder | None = None,
    runner_options: dict[str, Any] | None = None,
    started_at: float | None = None,
) -> JobSummary:
    """Render every image of the manifests whose shard is not done in the output yet; see docs/reruns.md.

    Raises `schemas.manifest.ManifestError` (before any model loads) for malformed manifests,
    ValueError for impossible settings and `jobs.publishing.lease.LeaseHeldError` when another run
    holds the output. A shard's results are published only after its images, its marker last.
    ``build`` and ``runner_options``: see `jobs.execution.chain.execute` (benchmarks). The timeline counts
    from ``started_at`` (epoch seconds; default now): the CLI passes its command's start.
    """
    timeline = Timeline(started=started_at)
    timeline.mark("run_started")
    for line in unreported(version_mismatches()):  # actors log their own processes' mismatches at start-up
        logger.warning("untested package version: %s", line)
    progress = progress or Progress(live=False)
    progress.begin(started_at=timeline.started)  # log mode: a line at least every --progress-every seconds
    try:
        return _run(config, progress, timeline, build=build, runner_options=runner_options)
    finally:
        progress.close()


def _run(
    config: JobConfig,
    progress: Progress,
    timeline: Timeline,
    *,
    build: ChainBuilder | None,
    runner_options: dict[str, Any] | None,
) -> JobSummary:
    started = time.monotonic() - (time.time() - timeline.started)  # wall seconds count from the timeline's start
    if config.runner == "ray":
        # an address that does not answer fails now, not after planning
        check_address(config.address, wait_s=config.connect_wait_s)
    storage = Storage(config.output, storage_options=config.storage_options)
    run_id = new_run_id()
    with (
        nothing_left_if_refused(storage),
        Lease(storage, run_id=run_id, ttl_s=config.lease_ttl_s, wait_s=config.lease_wait_s) as lease,
    ):
        timeline.mark("lease_taken")
        # Planning and the model checks come first: a run with nothing pending, or one that lacks a model, stops
        # before Ray starts. The stage modules (torch, diffusers) import meanwhile once there is work.
        progress.phase(
            f"planning: reading the manifest's footers and the completion log of {public_uri(config.output)}"
        )
        plan, scan, imports = _plan(config, storage, timeline)
        if plan.pixel_changes:  # --mixed-output: the new values are pinned, and this run recorded as changing them
            logger.warning(
                "run %s changes what %s pinned (--mixed-output): %s",
                run_id,
                public_uri(config.output),
                "; ".join(plan.pixel_changes),
            )
            pixels = plan.settings.pixels
            mixed = [*pixels.mixed, {"run_id": run_id, "changes": plan.pixel_changes}]
            plan.settings = dataclasses.replace(plan.settings, pixels=dataclasses.replace(pixels, mixed=mixed))
        log = CompletionLog(
            storage, plan.index, run_id=run_id, compact_every=config.compact_every, spool_dir=config.spool_dir
        )
        # Destructive steps last: every check has passed, and only the job's own files go.
        if config.overwrite:
            delete_output(storage)
        else:
            if plan.index.rebuilt:  # every marker was read: a checkpoint without the damaged shards comes first
                log.compact()
            delete_orphans(storage, plan.index)
        if not plan.pending:
            apply_corrections(plan, log, run_id=run_id)  # those a stopped run left to apply (docs/corrections.md)
            log.compact()  # markers a stopped run left after the checkpoint
            stats = _nothing_pending(plan, storage, progress, run_id=run_id, timeline=timeline, started=started)
            return JobSummary(run_id=run_id, plan=plan, stats=stats)
        progress.phase(
            f"planned: {len(plan.pending)} shard(s) to render ({scan.num_images} image(s)); models checked: "
            + ", ".join(sorted({"prior", *(MODES[mode].checkpoint for mode in scan.modes)} | _depth(scan)))
        )
        address = config.address or os.environ.get("RAY_ADDRESS")
        if config.runner == "ray":
            progress.phase(f"joining the Ray cluster at {address}" if address else "starting a private local Ray")
        with session(config, timeline, imports=imports) as machine:
            progress.phase(f"{machine.source}: {machine.cpus:g} CPU(s), {machine.gpus:g} GPU(s)")
            plan, choices = with_machine_defaults(plan, scan, machine)
            log_choices(machine, choices)
            stats = _render(
                plan,
                scan,
                storage,
                log,
                lease,
                progress,
                run_id=run_id,
                timeline=timeline,
                machine=machine,
                build=build,
                runner_options=runner_options,
                started=started,
            )
            stats["defaults"] = stats_record(machine, choices)
            note_changed_checkpoints(scan.pins, storage_options=config.storage_options)
            progress.phase("every shard published; writing the gallery, stats.json and _SUCCESS")
            _report(plan, storage, stats, run_id=run_id, timeline=timeline)  # before Ray shuts down: no wait for it
        stats["timeline"] = timeline.seconds()  # with Ray's shutdown, for the caller (stats.json has it without)
    return JobSummary(run_id=run_id, plan=plan, stats=stats)


def _plan(config: JobConfig, storage: Storage, timeline: Timeline) -> tuple[RunPlan, PendingScan, Thread | None]:
    """The run's plan and what its pending shards need, each needed model checked to be loadable.

    Also starts importing the stage modules (a thread, returned) once there is work. Raises
    `jobs.planning.availability.ModelUnavailableError` when a needed model cannot be loaded.
    """
    plan = plan_run(config, storage, check_pins=False)
    imports = start_imports(plan.config) if plan.pending else None
    try:
        scan = check_models(plan, plan.scan())
    except ModelUnavailableError:
        check_pinned(plan.config, plan.pinned_pixels)  # a changed flag is named before a model that cannot load
        raise
    # The flags and the checkpoints' contents, resolved now, against what the output pinned (before any model loads).
    pixels, plan.pixel_changes = settle(plan.config, plan.pinned_pixels, scan.model_ids, rendering=bool(plan.pending))
    plan.settings = dataclasses.replace(plan.settings, pixels=pixels)
    timeline.mark("planned")
    return plan, scan, imports


def _report(plan: RunPlan, storage: Storage, stats: dict[str, Any], *, run_id: str, timeline: Timeline) -> None:
    """The end of a run: the gallery, stats.json, then ``_SUCCESS``."""
    stats["timeline"] = timeline.seconds()
    stats["last_render"] = last_render(storage, stats)
    chosen = plan.index.sample.chosen()
    stats["report"] = write_report(storage, chosen, stats=stats, scores_summary=plan.index.scores)
    timeline.mark("gallery_written")
    stats["timeline"] = timeline.seconds()
    write_stats(storage, stats)
    storage.write_bytes(SUCCESS_FILE, f"{run_id}\n".encode())


def _nothing_pending(
    plan: RunPlan, storage: Storage, progress: Progress, *, run_id: str, timeline: Timeline, started: float
) -> dict[str, Any]:
    """A run whose every shard is done already: no Ray, no model; the report is made again from the markers."""
    logger.info(
        "run %s: nothing to render: all %d shard(s) of the %d manifest file(s) are done in %s (%d image(s)); "
        "Ray not started",
        run_id,
        plan.num_shards,
        len(plan.files),
        plan.config.output,
        plan.index.totals.num_images,
    )
    write_settings(storage, plan.settings)
    timeline.mark("rendered")  # no progress lines: the line above says it all (not "started: 0/0 images (100%)")
    stats = run_stats(
        run_id=run_id,
        config=plan.config,
        plan=plan,
        this_run=Counts(),
        parts=[],
        stage_info={"runner": "none: nothing to render"},
        render_seconds=0.0,
        wall_seconds=time.monotonic() - started,
        skipped=plan.index.totals.num_images,
    )
    _report(plan, storage, stats, run_id=run_id, timeline=timeline)
    return stats


def _render(
    plan: RunPlan,
    scan: PendingScan,
    storage: Storage,
    log: CompletionLog,
    lease: Lease,
    progress: Progress,
    *,
    run_id: str,
    timeline: Timeline,
    machine: Machine,
    build: ChainBuilder | None,
    runner_options: dict[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    """Stream the pending shards through the stages, publish each shard's marker; the run's stats."""
    config = plan.config
    logger.info(
        "run %s: %d rows in %d file(s), %d shard(s), %d already done, %d to render (%d images)",
        run_id,
        plan.num_rows,
        len(plan.files),
        plan.num_shards,
        plan.num_shards - len(plan.pending),
        len(plan.pending),
        scan.num_images,
    )
    already_final = plan.index.totals.num_images  # less the images retries render again (known once planned)
    pixels = plan.settings.pixels
    if pixels.dtype == "auto":  # pinned as the dtype that makes the images (auto resolves to it on later runs)
        dtype = decoder_dtype(config, cluster_gpus=stage_gpus(config, machine), needs_depth=scan.needs_depth)
        plan.settings = dataclasses.replace(plan.settings, pixels=dataclasses.replace(pixels, dtype=dtype))
    write_settings(storage, plan.settings)
    write_card(storage, plan.settings, embeddings=saved_embeddings(plan))
    storage.delete(SUCCESS_FILE)
    duplicates = DuplicateImages(num_images=scan.num_images, scratch_dir=config.spool_dir)
    progress.start(run_id=run_id, num_images=scan.num_images)
    metrics = MetricsRecorder(run_id)  # Ray's metrics (a no-op without Ray)
    metrics.set("run_images", scan.num_images, state="total")
    this_run = Counts()
    parts: list[PartSummary] = []
    stage_info: dict[str, Any] = {}
    open_works: dict[str, ShardWork] = {}
    render_started = time.monotonic()
    events = execute(
        config,
        tasks(plan, config, open_works, duplicates),
        stage_info=stage_info,
        timeline=timeline,
        machine=machine,
        build=build,
        runner_options=runner_options,
        modes=scan.modes,
        needs_depth=scan.needs_depth,
        call_shapes=scan.call_shapes,
        movq_scales={MODES[mode].checkpoint: plan.scales[MODES[mode].checkpoint] for mode in scan.modes},
        pins=scan.pins,
        model_ids={name: identity.short for name, identity in scan.model_ids.items()},
        output_format=plan.settings.output_format,
        run_id=run_id,
        watcher=progress,
        metrics=metrics,
    )
    for event in events:
        if lease.lost.is_set():
            raise LeaseLostError(f"run {run_id} lost the lease on {config.output}; stopping")
        if isinstance(event, BatchDone):
            _done(progress, metrics, num_done=event.info["rows"], num_errors=event.info["errors"])
            if plan.settings.output_format == FORMAT_FILES:  # each image is on storage once its batch is added
                _first_image(timeline, progress)
            continue
        assert isinstance(event, TaskDone)
        shard, summary = open_works.pop(event.tag), event.result
        if shard.retried is None:
            log.publish(new_marker(shard.shard, summary, output_format=plan.settings.output_format))
        else:
            already_final -= len(shard.retried.keys)
            log.publish(
                retried_marker(shard.retried, summary),
                previous=shard.retried.marker,
                added_scores=summary.scores,
                replaced=shard.retried.keys,
            )
        metrics.published(summary.counts)
        _first_image(timeline, progress)  # other formats: a shard's images are stored when it is published
        timeline.mark("first_shard_published")
        this_run.add(summary.counts)
        parts.append(summary)
        refused = shard.work.refused.num_rows
        if refused:
            _done(progress, metrics, num_done=refused, num_errors=refused)
    progress.finish()
    apply_corrections(plan, log, run_id=run_id)  # each correction is durable now: the rows it supersedes go
    log.compact()
    timeline.mark("rendered")
    repeats = duplicates.finish()
    if repeats.num_repeated:
        logger.warning("duplicate images (the same prompt inputs, settings and seed): %s", repeats.line())
    return run_stats(
        run_id=run_id,
        config=config,
        plan=plan,
        this_run=this_run,
        parts=parts,
        stage_info=stage_info,
        render_seconds=time.monotonic() - render_started,
        wall_seconds=time.monotonic() - started,
        skipped=already_final,
        duplicates=repeats,
    )


def saved_embeddings(plan: RunPlan) -> tuple[str, int] | None:
    """(dtype, dim) of the embeddings this run saves with each image (``--save-embeddings``), or None."""
    dtype = plan.config.save_embeddings
    return None if dtype is None else (dtype, plan.scales.embedding_dim())


def _done(progress: Progress, metrics: MetricsRecorder, *, num_done: int, num_errors: int) -> None:
    """Images that got a result: the progress lines and the run's gauges."""
    progress.update(num_done=num_done, num_errors=num_errors)
    metrics.set("run_images", progress.num_done, state="done")
    metrics.set("run_images", progress.num_errors, state="errors")


def _first_image(timeline: Timeline, progress: Progress) -> None:
    if "first_image_stored" not in timeline.marks:
        timeline.mark("first_image_stored")
        progress.phase("first image stored")


def _depth(scan: PendingScan) -> set[str]:
    return {DEPTH_MODEL} if scan.needs_depth else set()
