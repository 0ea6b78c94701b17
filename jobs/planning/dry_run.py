"""``--dry-run``: what a run would render, in rows and images per mode and size, batches per stage and
estimated GPU-seconds, without loading any model or writing anything."""

from __future__ import annotations

import collections
from typing import Any

from actors.storage import Storage
from jobs.planning.calibration import DEFAULT_CALIBRATION, Profile, estimate, load_calibration
from jobs.planning.plan import Plan, make_plan
from schemas.config import JobConfig
from schemas.manifest import SUPPORTED_MODES


def plan_for_dry_run(config: JobConfig) -> Plan:
    """The plan a run would execute now (with ``--overwrite`` everything renders; nothing is deleted)."""
    from jobs.execution.job import plan_job

    if config.overwrite:
        return make_plan(config, done=None, supported_modes=SUPPORTED_MODES)
    return plan_job(config, Storage(config.output, storage_options=config.storage_options))


def breakdown(plan: Plan) -> list[dict[str, Any]]:
    """Rows and images to render per (mode, height, width), sorted."""
    rows: dict[tuple[str, int, int], set[str]] = collections.defaultdict(set)
    images: collections.Counter[tuple[str, int, int]] = collections.Counter()
    for batch in plan.batches:
        for row_id, mode, height, width in zip(
            batch.column("id").to_pylist(),
            batch.column("mode").to_pylist(),
            batch.column("height").to_pylist(),
            batch.column("width").to_pylist(),
        ):
            rows[(mode, height, width)].add(row_id)
            images[(mode, height, width)] += 1
    return [
        {"mode": mode, "height": height, "width": width, "rows": len(rows[key]), "images": images[key]}
        for key in sorted(images)
        for mode, height, width in [key]
    ]


def _stage_line(name: str, num_actors: int | None, num_gpus: float | None, placement: dict[str, Any]) -> str:
    # None fields are decided by cluster.resources.resolve_stages when the job starts.
    if num_actors:
        actors = f"{num_actors} actor(s)"
    else:
        actors = "1 actor" if name == "prior" else "one actor per GPU left after the prior (1 on CPU clusters)"
    gpus = f"{num_gpus:g} GPU each" if num_gpus is not None else "1 GPU each (0.5 on a 1-GPU cluster, 0 on CPU)"
    where = [f"accelerator type {placement['accelerator_type']}"] if placement.get("accelerator_type") else []
    where += [f"{key}={value}" for key, value in placement.get("label_selector", {}).items()]
    return f"{name}: {actors}, {gpus}" + (f", on nodes with {', '.join(where)}" if where else "")


def describe(config: JobConfig, plan: Plan, *, profiles: list[Profile], calibration: str) -> str:
    """The text ``--dry-run`` prints."""
    table = breakdown(plan)
    refused_ids = len(set(plan.refused.column("id").to_pylist())) if plan.refused.num_rows else 0
    lines = [
        "dry run: no model loaded, nothing written",
        f"manifest {config.manifest}: {len(plan.files)} file(s), {plan.num_rows} row(s), "
        f"{plan.num_images} image(s) requested",
        f"output   {config.output}: {plan.num_done} image(s) already final (skipped)",
        "",
    ]
    header = ("mode", "height x width", "rows", "images")
    body = [(r["mode"], f"{r['height']}x{r['width']}", str(r["rows"]), str(r["images"])) for r in table]
    body.append(("refused (invalid rows)", "", str(refused_ids), str(plan.refused.num_rows)))
    body.append(("to render", "", str(sum(r["rows"] for r in table)), str(plan.num_to_render)))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
    for row in [header, *body]:
        lines.append(f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
    lines += [
        "",
        f"batches per stage (batch size {config.batch_size}): prior {len(plan.batches)}, decoder {len(plan.batches)}",
        "  "
        + _stage_line("prior", config.prior.num_actors, config.prior.num_gpus, config.stage_placement.get("prior", {})),
        "  "
        + _stage_line(
            "decoder", config.decoder.num_actors, config.decoder.num_gpus, config.stage_placement.get("decoder", {})
        ),
        "",
        f"estimated GPU-seconds (busy time of one GPU per actor), calibration {calibration}:",
    ]
    est_rows = [("profile", "prior", "decoder", "total", "basis")]
    sources: dict[str, list[str]] = {}
    for profile in profiles:
        seconds = estimate(plan.batches, profile)
        basis = "measured" if profile.measured else "NOT measured"
        est_rows.append(
            (profile.name, f"{seconds['prior']:.1f}", f"{seconds['decoder']:.1f}", f"{seconds['total']:.1f}", basis)
        )
        sources.setdefault(profile.source, []).append(profile.name)
    widths = [max(len(row[i]) for row in est_rows) for i in range(4)]
    for name, prior, decoder, total, basis in est_rows:
        lines.append(
            f"  {name:<{widths[0]}}  {prior:>{widths[1]}}  {decoder:>{widths[2]}}  {total:>{widths[3]}}  {basis}"
        )
    for source, names in sources.items():
        lines.append(f"  {', '.join(names)}: {source}")
    return "\n".join(lines)


def dry_run(config: JobConfig, *, calibration: str | None = None) -> str:
    """Plan ``config`` against its output as it is now and describe it (see `describe`)."""
    path = calibration or DEFAULT_CALIBRATION
    profiles = load_calibration(path)
    plan = plan_for_dry_run(config)
    return describe(config, plan, profiles=profiles, calibration=path)
