"""``--dry-run``: what a run would render, in rows and images per mode and size, batches per stage and
estimated GPU-seconds, without loading any model or writing anything."""

from __future__ import annotations

from typing import Any

from actors.storage import Storage
from jobs.planning.calibration import DEFAULT_CALIBRATION, Profile, estimate, load_calibration
from jobs.planning.plan import Plan, make_plan, prior_batch_size
from schemas.config import JobConfig
from schemas.modes import PRIOR_KINDS, needs_depth


def plan_for_dry_run(config: JobConfig) -> Plan:
    """The plan a run would execute now (with ``--overwrite`` everything renders; nothing is deleted)."""
    from jobs.execution.job import plan_job

    if config.overwrite:
        return make_plan(config, done=None)
    return plan_job(config, Storage(config.output, storage_options=config.storage_options))


def breakdown(plan: Plan) -> list[dict[str, Any]]:
    """Rows and images to render per (mode, height, width), sorted."""
    work = plan.batches.work.select(["id", "mode", "height", "width"])
    counts = work.group_by(["mode", "height", "width"]).aggregate([("id", "count"), ("id", "count_distinct")])
    return sorted(
        (
            {
                "mode": r["mode"],
                "height": r["height"],
                "width": r["width"],
                "rows": r["id_count_distinct"],
                "images": r["id_count"],
            }
            for r in counts.to_pylist()
        ),  # fmt: skip
        key=lambda r: (r["mode"], r["height"], r["width"]),
    )


def stage_calls(plan: Plan, config: JobConfig) -> dict[str, int]:
    """Model calls per stage: prior calls as the runner groups decoder batches, depth calls when needed."""
    from jobs.execution.job import work_groups

    size = prior_batch_size(config)
    calls = {"depth": 0, "prior": 0, "decoder": len(plan.batches)}
    for group in work_groups(plan, config):
        rows = sum(batch.num_rows for batch in group)
        kind = PRIOR_KINDS[group[0].column("prior_kind")[0].as_py()]
        calls["prior"] += rows if kind.alone else -(-rows // size)
        if plan.needs_depth and any(needs_depth(row) for b in group for row in b.select(["mode", "hint"]).to_pylist()):
            calls["depth"] += 1
    return calls


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
    refused = plan.refused.select(["id", "error_kind"])
    refused = refused.group_by(["error_kind"]).aggregate([("id", "count"), ("id", "count_distinct")]).to_pylist()
    lines = [
        "dry run: no model loaded, nothing written",
        f"manifest {config.manifest}: {len(plan.files)} file(s), {plan.num_rows} row(s), "
        f"{plan.num_images} image(s) requested",
        f"output   {config.output}: {plan.num_done} image(s) already final (skipped)",
        "",
    ]
    header = ("mode", "height x width", "rows", "images")
    body = [(r["mode"], f"{r['height']}x{r['width']}", str(r["rows"]), str(r["images"])) for r in table]
    for kind in sorted(refused, key=lambda r: r["error_kind"]):
        body.append((f"refused ({kind['error_kind']})", "", str(kind["id_count_distinct"]), str(kind["id_count"])))
    body.append(("to render", "", str(sum(r["rows"] for r in table)), str(plan.num_to_render)))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
    for row in [header, *body]:
        lines.append(f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
    calls = stage_calls(plan, config)
    sizes = f"decoder batch size {config.batch_size}, prior batch size {prior_batch_size(config)}"
    stages = [name for name in ("depth", "prior", "decoder") if name != "depth" or plan.needs_depth]
    lines += ["", f"model calls per stage ({sizes}): " + ", ".join(f"{name} {calls[name]}" for name in stages)]
    for name in stages:
        resources = getattr(config, name)
        placement = config.stage_placement.get(name, {})
        lines.append("  " + _stage_line(name, resources.num_actors, resources.num_gpus, placement))
    lines += ["", f"estimated GPU-seconds (busy time of one GPU per actor), calibration {calibration}:"]
    est_rows = [("profile", "prior", "decoder", "total", "basis")]
    sources: dict[str, list[str]] = {}
    for profile in profiles:
        seconds = estimate(plan.batches.work, profile)
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
