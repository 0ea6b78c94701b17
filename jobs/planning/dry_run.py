"""``--dry-run``: what a run would render, in rows and images per mode and size, model calls per stage and
estimated GPU-seconds, without loading any model or writing anything. Shards are planned one at a time
and only their counts are kept, so a dry run over any manifest holds one shard's rows."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from actors.storage import Storage
from jobs.options.flags import option_at
from jobs.planning.availability import ModelUnavailableError, needed_models
from jobs.planning.batches import group_batches, prior_batch_size
from jobs.planning.calibration import DEFAULT_CALIBRATION, Profile, estimate, load_calibration, unit_totals
from jobs.planning.machine import local_machine
from jobs.planning.run_plan import RunPlan, plan_run, with_machine_defaults
from jobs.planning.work import Work, needs_depth
from schemas.config import JobConfig, StageResources
from schemas.modes import PRIOR_KINDS
from schemas.stages import ALWAYS, MODEL_STAGES, StageInfo


@dataclass(kw_only=True)
class Census:
    """Counts over the pending shards' plans (added shard by shard)."""

    images: collections.Counter[tuple[str, int, int]] = field(default_factory=collections.Counter)
    rows: collections.Counter[tuple[str, int, int]] = field(default_factory=collections.Counter)
    refused_images: collections.Counter[str] = field(default_factory=collections.Counter)
    refused_rows: collections.Counter[str] = field(default_factory=collections.Counter)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    units: collections.Counter[str] = field(default_factory=collections.Counter)
    num_to_render: int = 0

    def add(self, shard: Work, config: JobConfig) -> None:
        """Count one shard's work."""
        work = shard.batches.work
        self.num_to_render += work.num_rows
        for row in _grouped(work, ["mode", "height", "width"]):
            key = (row["mode"], row["height"], row["width"])
            self.images[key] += row["id_count"]
            self.rows[key] += row["id_count_distinct"]
        for row in _grouped(shard.refused, ["error_kind"]):
            self.refused_images[row["error_kind"]] += row["id_count"]
            self.refused_rows[row["error_kind"]] += row["id_count_distinct"]
        size = prior_batch_size(config)
        depth = shard.needs_depth
        self.calls["decoder"] += len(shard.batches)
        if config.score:
            self.calls["score"] += len(shard.batches)
        for group in group_batches(shard.batches, max_rows=size):
            rows = sum(batch.num_rows for batch in group)
            self.calls["prior"] += (
                rows if PRIOR_KINDS[group[0].column("prior_kind")[0].as_py()].alone else -(-rows // size)
            )
            if depth and needs_depth(pa.concat_tables(group)):
                self.calls["depth"] += 1
        if work.num_rows:
            self.units.update(unit_totals(work))


def _grouped(table: pa.Table, keys: list[str]) -> list[dict[str, Any]]:
    if not table.num_rows:
        return []
    return table.select(["id", *keys]).group_by(keys).aggregate([("id", "count"), ("id", "count_distinct")]).to_pylist()


def census(plan: RunPlan) -> Census:
    """Plan every pending shard, one at a time, keeping only counts."""
    counts = Census()
    for shard in plan.works():
        counts.add(shard.work, plan.config)
    return counts


def _stage_line(stage: StageInfo, resources: StageResources, placement: dict[str, Any]) -> str:
    """One stage's resources; unset ones as ``--help`` says they are decided when the job starts."""
    actors = option_at(JobConfig, stage.config_field, "num_actors")
    gpus = option_at(JobConfig, stage.config_field, "num_gpus")
    num_actors = f"{resources.num_actors} actor(s)" if resources.num_actors else f"actors: {actors.default_text or 1}"
    num_gpus = f"{resources.num_gpus:g} GPU each" if resources.num_gpus is not None else f"GPUs: {gpus.default_text}"
    where = [f"accelerator type {placement['accelerator_type']}"] if placement.get("accelerator_type") else []
    where += [f"{key}={value}" for key, value in placement.get("label_selector", {}).items()]
    return f"{stage.name}: {num_actors}, {num_gpus}" + (f", on nodes with {', '.join(where)}" if where else "")


def _table(rows: list[tuple[str, ...]], aligns: str) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(aligns))]
    return ["  " + "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, aligns, widths)).rstrip() for row in rows]


def describe(config: JobConfig, plan: RunPlan, counts: Census, *, profiles: list[Profile], calibration: str) -> str:
    """The text ``--dry-run`` prints."""
    done = plan.num_shards - len(plan.pending)
    retried = sum(1 for _, previous in plan.pending if previous is not None)
    retries = f", {retried} of them retries" if retried else ""
    files = f"{len(plan.files)} file(s), {plan.num_rows} row(s), {plan.num_shards} shard(s)"
    lines = [
        "dry run: no model loaded, nothing written",
        f"manifest {config.manifest}: {files} of up to {plan.settings.shard_rows} rows",
        f"output   {config.output} ({plan.settings.output_format}): {done} shard(s) done, "
        f"{plan.index.totals.num_images} image(s) already final; {len(plan.pending)} shard(s) to render{retries}",
        "",
    ]
    body = [("mode", "height x width", "rows", "images")]
    body += [(m, f"{h}x{w}", str(counts.rows[(m, h, w)]), str(n)) for (m, h, w), n in sorted(counts.images.items())]
    for kind in sorted(counts.refused_images):
        body.append((f"refused ({kind})", "", str(counts.refused_rows[kind]), str(counts.refused_images[kind])))
    body.append(("to render", "", str(sum(counts.rows.values())), str(counts.num_to_render)))
    lines += _table(body, "<<>>")
    sizes = f"decoder batch size {config.batch_size}, prior batch size {prior_batch_size(config)}"
    stages = [stage.name for stage in MODEL_STAGES if stage.present == ALWAYS or counts.calls[stage.name]]
    lines += ["", f"model calls per stage ({sizes}): " + ", ".join(f"{name} {counts.calls[name]}" for name in stages)]
    for stage in MODEL_STAGES:
        if stage.name in stages:
            placement = config.stage_placement.get(stage.name, {})
            lines.append("  " + _stage_line(stage, getattr(config, stage.config_field), placement))
    lines += ["", f"estimated GPU-seconds (busy time of one GPU per actor), calibration {calibration}:"]
    scoring = bool(config.score)
    rows = [("profile", "prior", "decoder", *(["score"] if scoring else []), "total", "basis")]
    sources: dict[str, list[str]] = {}
    totals = {name: counts.units[name] for name in ("prior_steps", "decoder_steps", "decoder_images", "scored_images")}
    if not scoring:
        totals["scored_images"] = 0.0
    for profile in profiles:
        seconds = estimate(totals, profile)
        basis = "measured" if profile.measured else "NOT measured"
        columns = ("prior", "decoder", *(["score"] if scoring else []), "total")
        basis += "" if not scoring or profile.score_image_seconds else " (no score cost in it)"
        rows.append((profile.name, *(f"{seconds[k]:.1f}" for k in columns), basis))
        sources.setdefault(profile.source, []).append(profile.name)
    lines += _table(rows, "<" + ">" * (len(rows[0]) - 2) + "<")
    lines += [f"  {', '.join(names)}: {source}" for source, names in sources.items()]
    return "\n".join(lines)


def dry_run(config: JobConfig, *, calibration: str | None = None) -> str:
    """Plan ``config`` against its output as it is now and describe it (with ``--overwrite``: as if empty).

    Raises `jobs.planning.availability.ModelUnavailableError` when the run would lack a model it needs (its
    ``report`` holds the plan: a dry run on a machine without the models still shows it).
    """
    path = calibration or DEFAULT_CALIBRATION
    profiles = load_calibration(path)
    plan = plan_run(config, Storage(config.output, storage_options=config.storage_options))
    scan, missing = needed_models(plan, plan.scan())
    machine = local_machine()
    plan, choices = with_machine_defaults(plan, scan, machine)
    config = plan.config
    text = describe(config, plan, census(plan), profiles=profiles, calibration=path)
    if choices:
        chosen = "\n".join(f"  {choice.line()}" for choice in choices)
        text += (
            f"\n\ndefaults chosen for this machine ({machine.cpus:g} CPUs, no GPU seen without Ray); a job on "
            f"a cluster chooses for the cluster it finds:\n{chosen}"
        )
    if missing:  # the run would stop before starting any model: say so, after the plan
        raise ModelUnavailableError(missing, report=text)
    return text
