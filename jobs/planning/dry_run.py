"""``--dry-run``: what a run would render, in rows and images per mode and size, model calls per stage and
estimated GPU-seconds, without loading any model or writing anything. Shards are planned one at a time
and only their counts are kept, so a dry run over any manifest holds one shard's rows."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from actors.storage import Storage
from cluster.resources import StageLayout, resolve_groups
from jobs.planning.availability import ModelUnavailableError, needed_models
from jobs.planning.batches import group_batches, prior_batch_size
from jobs.planning.calibration import (
    DEFAULT_CALIBRATION,
    ESTIMATE_EFFICIENCY,
    Profile,
    estimate,
    load_calibration,
    profiles_with_estimates,
    unit_totals,
)
from jobs.planning.duplicates import DuplicateImages
from jobs.planning.forecast import describe_forecast, forecast, parse_clusters
from jobs.planning.machine import local_machine
from jobs.planning.run_plan import RunPlan, plan_run, with_machine_defaults
from jobs.planning.work import Work, hint_estimates, needs_depth
from schemas.config import JobConfig
from schemas.modes import PRIOR_KINDS
from schemas.stages import ALWAYS, MODEL_STAGES
from schemas.work import PRIOR_CALL_KEY


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
    depth_images: int = 0  # images whose hint the depth stage estimates

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
            rows = pa.concat_tables(group)
            for key in _grouped(rows, list(PRIOR_CALL_KEY)):  # the prior's model calls: one per key, cut to size
                count = key["id_count"]
                self.calls["prior"] += count if PRIOR_KINDS[key["prior_kind"]].alone else -(-count // size)
            if depth and needs_depth(rows):
                self.calls["depth"] += 1
        if work.num_rows:
            self.units.update(unit_totals(work))
            self.depth_images += hint_estimates(work)

    def totals(self, *, score: bool) -> dict[str, float]:
        """The `unit_totals` of everything to render (scored images only with ``score``)."""
        return {name: float(value) if name != "scored_images" or score else 0.0 for name, value in self.units.items()}

    def as_dict(self) -> dict[str, Any]:
        """The counts as ``--dry-run --json`` writes them."""
        return {
            "to_render": {"rows": sum(self.rows.values()), "images": self.num_to_render},
            "by_mode_and_size": [
                {"mode": m, "height": h, "width": w, "rows": self.rows[(m, h, w)], "images": n}
                for (m, h, w), n in sorted(self.images.items())
            ],
            "refused": {
                kind: {"rows": self.refused_rows[kind], "images": n} for kind, n in self.refused_images.items()
            },
            "calls": dict(self.calls),
            "depth_images": self.depth_images,
        }


def _grouped(table: pa.Table, keys: list[str]) -> list[dict[str, Any]]:
    if not table.num_rows:
        return []
    return table.select(["id", *keys]).group_by(keys).aggregate([("id", "count"), ("id", "count_distinct")]).to_pylist()


def census(plan: RunPlan, duplicates: DuplicateImages | None = None) -> Census:
    """Plan every pending shard, one at a time, keeping only counts (and their images' signatures in ``duplicates``)."""
    counts = Census()
    for shard in plan.works(duplicates):
        counts.add(shard.work, plan.config)
    return counts


def _resources(layout: StageLayout) -> str:
    where = [f"accelerator type {layout.placement.accelerator_type}"] if layout.placement.accelerator_type else []
    where += [f"{key}={value}" for key, value in layout.placement.label_selector.items()]
    text = f"{layout.num_actors} actor(s) x {layout.num_gpus:g} GPU, {layout.num_cpus:g} CPU"
    return text + (f", on nodes with {', '.join(where)}" if where else "")


def _table(rows: list[tuple[str, ...]], aligns: str) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(aligns))]
    return ["  " + "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, aligns, widths)).rstrip() for row in rows]


def describe(
    config: JobConfig, plan: RunPlan, counts: Census, *, profiles: list[Profile], calibration: str, local: bool = True
) -> str:
    """The text ``--dry-run`` prints; ``local``: with the actors this machine's defaults give (not for a plan for
    other clusters, whose own actors their plans show)."""
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
    stages = [stage.name for stage in MODEL_STAGES if stage.present == ALWAYS or counts.calls[stage.name]]
    if local:
        sizes = f"decoder batch size {config.batch_size}, prior batch size {prior_batch_size(config)}"
        calls = ", ".join(f"{name} {counts.calls[name]}" for name in stages)
        lines += ["", f"model calls per stage ({sizes}): {calls}"]
    if local and config.layout is not None:  # the actors this machine's defaults give (a cluster's: --plan-for)
        groups, writers = resolve_groups(config, cluster_gpus=0.0, needs_depth=counts.depth_images > 0)
        for group in groups:
            lines.append(f"  {group.name} ({', '.join(group.stages)}): {_resources(group.resources)}")
        lines.append(f"  writer: {_resources(writers)}")
    lines += ["", f"estimated GPU-seconds (busy time of one GPU per actor), calibration {calibration}:"]
    scoring = bool(config.score)
    rows = [("profile", "prior", "decoder", *(["score"] if scoring else []), "total", "basis")]
    sources: dict[str, list[str]] = {}
    totals = counts.totals(score=scoring)
    for profile in profiles:
        seconds = estimate(totals, profile)
        basis = "measured" if profile.measured else f"estimated ({ESTIMATE_EFFICIENCY:.0%} of peak)"
        columns = ("prior", "decoder", *(["score"] if scoring else []), "total")
        basis += "" if not scoring or profile.score_image_seconds else " (no score cost in it)"
        rows.append((profile.name, *(f"{seconds[k]:.1f}" for k in columns), basis))
        sources.setdefault(profile.source, []).append(profile.name)
    lines += _table(rows, "<" + ">" * (len(rows[0]) - 2) + "<")
    lines += [f"  {', '.join(names)}: {source}" for source, names in sources.items()]
    return "\n".join(lines)


# GPU types whose estimated GPU-seconds a dry run shows when no --plan-for names any.
SHOWN_ESTIMATES = ("L4", "L40S", "A100", "H100", "H200")


def dry_run(
    config: JobConfig, *, calibration: str | None = None, plan_for: tuple[str, ...] = (), as_json: bool = False
) -> str:
    """Plan ``config`` against its output as it is now and describe it (with ``--overwrite``: as if empty).

    ``plan_for``: hypothetical clusters (``8xH100``) to forecast the run on (`jobs.planning.forecast`);
    ``as_json``: one JSON object instead of text. ValueError for an unknown GPU type or a cluster too
    small for the flags, before anything is read. Raises `jobs.planning.availability.ModelUnavailableError`
    when the run would lack a model it needs (its ``report`` holds the plan: a dry run on a machine without
    the models still shows it). A dry run with ``plan_for`` plans for another cluster: missing models are said,
    not raised.
    """
    path = calibration or DEFAULT_CALIBRATION
    file_profiles = load_calibration(path)
    clusters = parse_clusters(plan_for, profiles=file_profiles)
    wanted = [c.accelerator_type for c in clusters] or list(SHOWN_ESTIMATES)
    # A plan for clusters shows their GPU types only; a plain dry run also the calibration file's own profiles.
    profiles = [
        p for p in profiles_with_estimates(file_profiles) if p.name in wanted or (not clusters and p in file_profiles)
    ]
    plan = plan_run(config, Storage(config.output, storage_options=config.storage_options))
    scan, missing = needed_models(plan, plan.scan())
    machine = local_machine()
    plan, choices = with_machine_defaults(plan, scan, machine)
    duplicates = DuplicateImages(num_images=scan.num_images, scratch_dir=config.spool_dir)
    counts = census(plan, duplicates)
    repeats = duplicates.finish()
    forecasts = [
        forecast(
            config,  # the flags as given: each cluster chooses its own defaults
            cluster,
            totals=counts.totals(score=bool(config.score)),
            num_images=counts.num_to_render,
            depth_images=counts.depth_images,
            modes=scan.modes,
            largest_pixels=scan.largest_pixels,
            profiles=file_profiles,
        )
        for cluster in clusters
    ]
    if as_json:
        text = json.dumps(
            {
                "manifest": config.manifest,
                "output": config.output,
                "num_shards": plan.num_shards,
                "num_shards_pending": len(plan.pending),
                "num_images_final": plan.index.totals.num_images,
                **counts.as_dict(),
                "gpu_seconds": {
                    p.name: {**estimate(counts.totals(score=bool(config.score)), p), "measured": p.measured}
                    for p in profiles
                },
                "plans": forecasts,
                "duplicates": repeats.as_dict(),
                "models_unavailable_here": missing or None,
            },
            indent=2,
            default=str,
        )
        if missing and not clusters:
            raise ModelUnavailableError(missing, report=text)
        return text
    text = describe(plan.config, plan, counts, profiles=profiles, calibration=path, local=not clusters)
    if repeats.num_repeated:
        text += f"\n\nduplicate images (the same prompt inputs, settings and seed): {repeats.line()}"
    for item in forecasts:
        text += "\n\n" + "\n".join(describe_forecast(item, num_images=counts.num_to_render))
    if choices and not clusters:  # a plan for clusters: each chooses its own (its plan above)
        chosen = "\n".join(f"  {choice.line()}" for choice in choices)
        text += (
            f"\n\ndefaults chosen for this machine ({machine.cpus:g} CPUs, no GPU seen without Ray); a job on "
            f"a cluster chooses for the cluster it finds (--plan-for NxTYPE shows a GPU cluster's):\n{chosen}"
        )
    if missing and not clusters:  # the run would stop before starting any model: say so, after the plan
        raise ModelUnavailableError(missing, report=text)
    if missing:  # a plan for another cluster: this machine need not have the weights
        text += (
            "\n\nthe models are not reachable from this machine (a run here would stop, exit 2, until they are); "
            f"the plans above assume the checkpoints' published sizes:\n{missing}"
        )
    return text
