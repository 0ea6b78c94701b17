"""What a run would cost on a cluster that may not exist: ``--dry-run --plan-for 8xH100`` (one or more).

For each hypothetical cluster of N GPUs of one type: the defaults a job would choose there (the same
`cluster.defaults.choose_defaults` a real run uses), the actor groups they resolve to, and from the
stages' per-image costs on that GPU type (its calibration profile, measured or estimated) the
predicted images/s, wall time, GPU-hours and idle share of each GPU set, beside the best layout a
sweep of the alternatives finds (`cluster.layout.sweep`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cluster.accelerators import canonical_accelerator
from cluster.defaults import Machine
from cluster.layout import CLIP_GROUP, DECODER_GROUP, Layout, StageCosts, co_located, dedicated, sweep
from cluster.resources import StageGroup, resolve_groups
from jobs.planning.calibration import (
    ESTIMATE_EFFICIENCY,
    Profile,
    load_calibration,
    profiles_with_estimates,
    stage_costs,
)
from jobs.planning.machine import machine_defaults
from schemas.choices import LAYOUT_DEDICATED, LAYOUT_ONE_PROCESS, PLAN_FOR
from schemas.config import JobConfig
from schemas.resources import UNBOUNDED
from schemas.stages import DECODER

CPUS_PER_GPU = 8  # what a hypothetical cluster is assumed to have beside each GPU (1 per actor is enough)


@dataclass(frozen=True, kw_only=True)
class Hypothetical:
    """``NxTYPE``: N GPUs of accelerator type TYPE."""

    num_gpus: int
    accelerator_type: str

    @property
    def name(self) -> str:
        """How the flag wrote it."""
        return f"{self.num_gpus}x{self.accelerator_type}"


def parse_clusters(values: tuple[str, ...], *, profiles: list[Profile]) -> list[Hypothetical]:
    """``--plan-for`` values -> clusters (GPU types in any case: ``8xh100``); ValueError naming the value and the known
    GPU types."""
    known = {p.name for p in profiles_with_estimates(profiles)}
    gpu_types = sorted(name for name in known if not name.startswith("cpu"))  # CPU profiles are not GPU types
    clusters = []
    for value in values:
        match = PLAN_FOR.fullmatch(value)
        if match is None:
            raise ValueError(
                f"--plan-for {value!r}: expected NxTYPE, e.g. 8xH100 (known types: {', '.join(gpu_types)})"
            )
        count, given = int(match.group(1)), match.group(2)
        kind = next((name for name in known if name.upper() == canonical_accelerator(given).upper()), None)
        if kind is None:
            raise ValueError(f"--plan-for {value!r}: unknown GPU type {given!r}; known types: {', '.join(gpu_types)}")
        if count < 1:
            raise ValueError(f"--plan-for {value!r}: a cluster needs at least 1 GPU")
        clusters.append(Hypothetical(num_gpus=count, accelerator_type=kind))
    return clusters


def planned_cluster(config: JobConfig) -> Hypothetical:
    """A run's ``--plan-for``: exactly one cluster of a known GPU type; ValueError otherwise."""
    if len(config.plan_for) != 1:
        raise ValueError(
            f"--plan-for: a run plans for one cluster, got {len(config.plan_for)} (--dry-run takes several)"
        )
    (cluster,) = parse_clusters(config.plan_for, profiles=load_calibration())
    return cluster


def forecast(
    config: JobConfig,
    cluster: Hypothetical,
    *,
    totals: dict[str, float],
    num_images: int,
    depth_images: int,
    modes: list[str],
    largest_pixels: int,
    profiles: list[Profile],
) -> dict[str, Any]:
    """The layout a job would choose on ``cluster`` for this work, what it would yield, and the sweep's best.

    ``totals`` are the work's `jobs.planning.calibration.unit_totals`. Raises ValueError when the
    config asks for more GPUs than the cluster has (naming them).
    """
    profile = {p.name: p for p in profiles_with_estimates(profiles)}[cluster.accelerator_type]
    machine = Machine(
        cpus=float(CPUS_PER_GPU * cluster.num_gpus),
        gpus=float(cluster.num_gpus),
        accelerator_type=cluster.accelerator_type,
        source=f"--plan-for {cluster.name}",
    )
    chosen_config, choices = machine_defaults(
        config,
        machine,
        modes=modes,
        largest_pixels=largest_pixels,
        needs_depth=depth_images > 0,
        num_images=num_images,
        units=totals,
        depth_images=depth_images,
    )
    costs = stage_costs(
        profile,
        totals,
        num_images=num_images,
        score=bool(config.score),
        depth_images=depth_images,
        batch_size=chosen_config.batch_size,
        prior_batch_size=chosen_config.prior_batch_size,
    )
    try:
        groups, writers = resolve_groups(chosen_config, cluster_gpus=machine.gpus, needs_depth=depth_images > 0)
    except ValueError as exc:
        raise ValueError(f"--plan-for {cluster.name}: {exc}") from None
    layout = predict(chosen_config.layout or LAYOUT_DEDICATED, groups, costs=costs, num_gpus=cluster.num_gpus)
    best = sweep(num_gpus=cluster.num_gpus, costs=costs, clip_stages=layout.groups[0].stages)[0]
    seconds = num_images / layout.images_per_s if layout.images_per_s else 0.0
    return {
        "cluster": cluster.name,
        "num_gpus": cluster.num_gpus,
        "accelerator_type": cluster.accelerator_type,
        "costs": dataclasses.asdict(costs),
        "layout": layout.kind,
        "groups": [dataclasses.asdict(g) for g in layout.groups],
        "writers": writers.num_actors,
        # MIN:MAX of each actor group (MAX null: it grows with the cluster's nodes)
        "bounds": {
            g.name: [
                g.resources.num_actors,
                None
                if (g.resources.max_actors or 0) >= UNBOUNDED
                else g.resources.max_actors or g.resources.num_actors,
            ]
            for g in groups
        },
        "images_per_s": round(layout.images_per_s, 4),
        "images_per_s_per_gpu": round(layout.images_per_s_per_gpu, 4),
        "wall_seconds": round(seconds, 1),
        "gpu_hours": round(seconds * cluster.num_gpus / 3600, 3),
        "idle": {name: round(max(0.0, 1 - share), 4) for name, share in layout.busy.items()},
        "best": {"layout": best.describe(), "images_per_s": round(best.images_per_s, 4)},
        "of_best": round(layout.images_per_s / best.images_per_s, 4) if best.images_per_s else 1.0,
        "choices": [choice.as_dict() for choice in choices],
    }


def predict(kind: str, groups: list[StageGroup], *, costs: StageCosts, num_gpus: int) -> Layout:
    """What the resolved ``groups`` of a layout of ``kind`` yield for these costs (`cluster.layout` formulas)."""
    by_name = {group.name: group for group in groups}
    decoder = next(group for group in groups if DECODER.name in group.stages)
    clip = by_name.get(CLIP_GROUP)
    if kind == LAYOUT_ONE_PROCESS or clip is None:  # every stage in each actor: it does all the work of an image
        rate = decoder.resources.num_actors * min(1.0, decoder.resources.num_gpus) / (costs.clip + costs.decoder)
        return Layout(kind=kind, groups=(), num_gpus=num_gpus, images_per_s=rate, busy={"shared": 1.0})
    stages = clip.stages
    if clip.resources.num_gpus >= 1:
        layout = dedicated(num_gpus=num_gpus, num_clip_gpus=clip.resources.num_actors, costs=costs, clip_stages=stages)
        decoders = decoder.resources.num_actors
        if decoders != layout.group(DECODER_GROUP).num_actors:  # fewer decoders than the GPUs left (flags)
            rate = min(layout.images_per_s, decoders / costs.decoder)
            layout = dataclasses.replace(layout, images_per_s=rate)
        return layout
    return co_located(num_gpus=num_gpus, num_clip_actors=clip.resources.num_actors, costs=costs, clip_stages=stages)


def clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss (``1:02:03``), rounded to the second."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def describe_forecast(plan: dict[str, Any], *, num_images: int) -> list[str]:
    """The dry run's lines for one hypothetical cluster."""
    groups = ", ".join(
        f"{g['num_actors']} {g['name']} ({', '.join(g['stages'])}) x {g['num_gpus']:g} GPU" for g in plan["groups"]
    )
    layout = next((c["reason"] for c in plan["choices"] if c["flag"] == "--layout"), "as the flags ask")
    idle = ", ".join(f"{name} GPUs {share:.0%}" for name, share in plan["idle"].items())
    bounds = ", ".join(f"{name} {low}:{'' if high is None else high}" for name, (low, high) in plan["bounds"].items())
    basis = plan["costs"]["source"]
    if "estimated" in basis:
        basis += f": FLOP counts at {ESTIMATE_EFFICIENCY:.0%} of the GPU's peak plus per-call floors, not measured"
    return [
        f"plan for {plan['cluster']} ({basis}):",
        f"  layout {plan['layout']}: {groups or 'every stage in each actor'}; {plan['writers']} writer(s)",
        f"    pools MIN:MAX (no MAX: they grow as GPU nodes join): {bounds}",
        f"    why: {layout}",
        f"  predicted {plan['images_per_s']:.3g} images/s ({plan['images_per_s_per_gpu']:.3g} per GPU): "
        f"{num_images} image(s) in {clock(plan['wall_seconds'])} (h:mm:ss), {plan['gpu_hours']:.3g} GPU-hours; "
        f"idle: {idle}",
        f"  best of the layouts swept: {plan['best']['layout']} ({plan['best']['images_per_s']:.3g} images/s); "
        f"the chosen one gives {plan['of_best']:.1%} of it",
    ]
