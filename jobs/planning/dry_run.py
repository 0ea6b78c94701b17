"""``--dry-run``: what a run would render, in rows and images per mode and size, model calls per stage and
estimated GPU-seconds, without loading any model or writing anything. Shards are planned one at a time
and only their counts are kept, so a dry run over any manifest holds one shard's rows."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from actors.storage import Storage
from jobs.execution.machine import local_machine, plan_defaults
from jobs.planning.calibration import DEFAULT_CALIBRATION, Profile, estimate, load_calibration, unit_totals
from jobs.planning.plan import Plan, group_batches, plan_needs_depth, prior_batch_size
from jobs.planning.shards import RunPlan, plan_run
from schemas.config import JobConfig
from schemas.modes import PRIOR_KINDS

STAGES = ("depth", "prior", "decoder", "score")


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

    def add(self, plan: Plan, config: JobConfig) -> None:
        """Count one shard's plan."""
        work = plan.batches.work
        self.num_to_render += work.num_rows
        for row in _grouped(work, ["mode", "height", "width"]):
            key = (row["mode"], row["height"], row["width"])
            self.images[key] += row["id_count"]
            self.rows[key] += row["id_count_distinct"]
        for row in _grouped(plan.refused, ["error_kind"]):
            self.refused_images[row["error_kind"]] += row["id_count"]
            self.refused_rows[row["error_kind"]] += row["id_count_distinct"]
        size = prior_batch_size(config)
        depth = plan.needs_depth
        self.calls["decoder"] += len(plan.batches)
        if config.score:
            self.calls["score"] += len(plan.batches)
        for group in group_batches(plan.batches, max_rows=size):
            rows = sum(batch.num_rows for batch in group)
            self.calls["prior"] += (
                rows if PRIOR_KINDS[group[0].column("prior_kind")[0].as_py()].alone else -(-rows // size)
            )
            if depth and plan_needs_depth(pa.concat_tables(group)):
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
    for work in plan.works():
        counts.add(work.plan, plan.config)
    return counts


def _stage_line(name: str, num_actors: int | None, num_gpus: float | None, placement: dict[str, Any]) -> str:
    # None fields are decided by cluster.resources.resolve_stages when the job starts.
    default_actors = {"decoder": "one actor per GPU left after the prior (1 on CPU clusters)",
                      "score": "one actor per four decoders"}  # fmt: skip
    default_gpus = {"score": "0.25 GPU each, beside the decoders' 0.75 (0 on CPU)"}
    actors = f"{num_actors} actor(s)" if num_actors else default_actors.get(name, "1 actor")
    if num_gpus is not None:
        gpus = f"{num_gpus:g} GPU each"
    else:
        gpus = default_gpus.get(name, "1 GPU each (0.5 on a 1-GPU cluster, 0 on CPU)")
    where = [f"accelerator type {placement['accelerator_type']}"] if placement.get("accelerator_type") else []
    where += [f"{key}={value}" for key, value in placement.get("label_selector", {}).items()]
    return f"{name}: {actors}, {gpus}" + (f", on nodes with {', '.join(where)}" if where else "")


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
    stages = [name for name in STAGES if name in ("prior", "decoder") or counts.calls[name]]
    lines += ["", f"model calls per stage ({sizes}): " + ", ".join(f"{name} {counts.calls[name]}" for name in stages)]
    for name in stages:
        resources = config.scorer if name == "score" else getattr(config, name)
        placement = config.stage_placement.get(name, {})
        lines.append("  " + _stage_line(name, resources.num_actors, resources.num_gpus, placement))
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
    """Plan ``config`` against its output as it is now and describe it (with ``--overwrite``: as if empty)."""
    path = calibration or DEFAULT_CALIBRATION
    profiles = load_calibration(path)
    plan = plan_run(config, Storage(config.output, storage_options=config.storage_options))
    scan = plan.scan()
    machine = local_machine()
    plan, choices = plan_defaults(plan, scan, machine)
    config = plan.config
    text = describe(config, plan, census(plan), profiles=profiles, calibration=path)
    if not choices:
        return text
    chosen = "\n".join(f"  {choice.line()}" for choice in choices)
    return (
        f"{text}\n\ndefaults chosen for this machine ({machine.cpus:g} CPUs, no GPU seen without Ray); a job on "
        f"a cluster chooses for the cluster it finds:\n{chosen}"
    )
