"""Mapping from the job's stage settings to Ray resources: actor groups (actors, GPUs, CPUs each) and node types."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.layout import CLIP_GROUP, CLIP_SHARE, DECODER_GROUP, MODEL_GROUP
from schemas.choices import LAYOUT_DEDICATED, LAYOUT_ONE_PROCESS
from schemas.config import JobConfig
from schemas.resources import StageResources
from schemas.stages import DECODER, DEPTH, MODEL_STAGES, PRIOR, SCORE

# Ray's default node label naming the GPU model (set on every accelerator node, KubeRay or not).
ACCELERATOR_LABEL = "ray.io/accelerator-type"
# The label our cluster configs put on each GPU node type, naming the stage it is for.
STAGE_LABEL = "kandinsky-render/stage"


@dataclass(frozen=True, kw_only=True)
class StagePlacement:
    """Which nodes a stage's actors may run on; empty means any node with the resources.

    ``accelerator_type`` is Ray's ``accelerator_type`` actor option (e.g. ``A100``, ``L4``);
    ``label_selector`` is Ray's ``label_selector`` (Ray >= 2.49): ``{key: value}`` where value is
    ``v``, ``!v``, ``in(a,b)`` or ``!in(a,b)``.
    """

    accelerator_type: str | None = None
    label_selector: dict[str, str] = field(default_factory=dict)

    @property
    def is_any(self) -> bool:
        """True when the stage may run on any node."""
        return not self.accelerator_type and not self.label_selector


@dataclass(frozen=True, kw_only=True)
class StageLayout:
    """Resolved resources of one stage (or actor group): every field concrete.

    ``num_actors`` start at once and are kept; with ``max_actors`` the pool grows up to that many
    while work waits and a node can hold another (`schemas.resources.UNBOUNDED`: as many as fit), and
    idle actors above ``num_actors`` go. None: a fixed pool.
    """

    num_actors: int
    num_gpus: float
    num_cpus: float
    placement: StagePlacement = field(default_factory=StagePlacement)
    max_actors: int | None = None

    @property
    def elastic(self) -> bool:
        """Whether the pool may grow past ``num_actors``."""
        return self.max_actors is not None and self.max_actors > self.num_actors


@dataclass(frozen=True, kw_only=True)
class StageGroup:
    """Actors that serve ``stages`` together (one process holds each stage's model), with what each reserves."""

    name: str
    stages: tuple[str, ...]
    resources: StageLayout


def requested_gpus(config: JobConfig) -> float:
    """GPUs the flags ask for at start: MIN actors x GPUs of each model stage whose flags set both (else 0).

    On a cluster with an autoscaler they are asked for, not refused for want of GPUs up now.
    """
    total = 0.0
    for stage in MODEL_STAGES:
        resources: StageResources = getattr(config, stage.config_field)
        if resources.num_gpus and resources.min_actors:
            total += resources.min_actors * resources.num_gpus
    return total


def resolve_groups(
    config: JobConfig, *, cluster_gpus: float, needs_depth: bool
) -> tuple[list[StageGroup], StageLayout]:
    """The run's actor groups (model stages in `schemas.stages.STAGES` order) and its writer pool.

    ``config.layout`` (chosen for the machine by `cluster.defaults`, see `cluster.layout`) decides:
    ``one-process``: every model stage in one group with the decoder's resources (CPU clusters);
    ``dedicated`` / ``co-located``: a ``clip`` group (the prior, and scoring and depth unless their
    own resources are set) with the prior's resources, and a ``decoder`` group. Unset counts and
    shares take the layout's defaults: one CLIP actor; dedicated: whole GPUs, decoders on the GPUs
    left; co-located: the CLIP actor on `CLIP_SHARE` of a GPU, a decoder on the rest of every GPU.
    Raises ValueError for a layout that is not chosen, or GPUs the cluster does not have.
    """
    if config.layout is None:
        raise ValueError("the stage layout is not chosen yet (cluster.defaults.choose_defaults fills it)")
    present = [s for s in MODEL_STAGES if s.in_run(needs_depth=needs_depth, score=bool(config.score))]
    placement = {name: StagePlacement(**config.stage_placement.get(name, {})) for name in (PRIOR.name, DECODER.name)}
    decoder = config.decoder
    if config.layout == LAYOUT_ONE_PROCESS:
        count = decoder.min_actors
        if count is None:
            count = max(1, math.floor(cluster_gpus / decoder.num_gpus)) if decoder.num_gpus else 1
        resources = _layout(
            decoder, actors=count, gpus=(1.0 if cluster_gpus else 0.0), placement=placement[DECODER.name]
        )
        groups = [StageGroup(name=MODEL_GROUP, stages=tuple(s.name for s in present), resources=resources)]
    else:
        dedicated = config.layout == LAYOUT_DEDICATED
        own = {s.name for s in (SCORE, DEPTH) if _set(getattr(config, s.config_field))}  # stages asked for apart
        clip_stages = tuple(s.name for s in present if s is not DECODER and s.name not in own)
        prior = _layout(config.prior, actors=1, gpus=1.0 if dedicated else CLIP_SHARE, placement=placement[PRIOR.name])
        clip_gpus = prior.num_actors * prior.num_gpus if dedicated else 0.0  # the CLIP actors started at once
        decoder_gpus = decoder.num_gpus if decoder.num_gpus is not None else (1.0 if dedicated else 1 - CLIP_SHARE)
        left = cluster_gpus - clip_gpus
        count = decoder.min_actors
        if count is None:
            count = max(1, math.floor(left + 1e-9)) if decoder_gpus else 1
        groups = [
            StageGroup(name=CLIP_GROUP, stages=clip_stages, resources=prior),
            StageGroup(
                name=DECODER_GROUP,
                stages=(DECODER.name,),
                resources=_layout(decoder, actors=count, gpus=decoder_gpus, placement=placement[DECODER.name]),
            ),
        ]
        for stage in (s for s in present if s.name in own):
            resources = _layout(getattr(config, stage.config_field), actors=1, gpus=0.0, placement=StagePlacement())
            groups.insert(
                0 if stage is DEPTH else len(groups),
                StageGroup(name=stage.name, stages=(stage.name,), resources=resources),
            )
    needed = sum(group.resources.num_actors * group.resources.num_gpus for group in groups)
    if needed > cluster_gpus + 1e-9:
        asked = " + ".join(
            f"{g.resources.num_actors} {g.name} x {g.resources.num_gpus:g}" for g in groups if g.resources.num_gpus
        )
        raise ValueError(f"the stages ask for {needed:g} GPUs ({asked}) but the cluster has {cluster_gpus:g}")
    num_decoders = next(g.resources.num_actors for g in groups if DECODER.name in g.stages)
    writer = config.writer
    if writer.num_gpus:
        raise ValueError(f"writers encode and upload on CPUs; writer GPUs must be 0, got {writer.num_gpus}")
    writers = _layout(writer, actors=max(1, -(-num_decoders // 2)), gpus=0.0, placement=StagePlacement())
    return groups, writers


def _set(resources: StageResources) -> bool:
    return resources.num_actors is not None or resources.num_gpus is not None


def _layout(resources: StageResources, *, actors: int, gpus: float, placement: StagePlacement) -> StageLayout:
    """``resources`` with unset fields taken from these defaults (CPUs: 1; a fixed pool)."""
    low, high = resources.min_actors, resources.max_actors
    return StageLayout(
        num_actors=actors if low is None else low,
        num_gpus=gpus if resources.num_gpus is None else resources.num_gpus,
        num_cpus=1.0 if resources.num_cpus is None else resources.num_cpus,
        placement=placement,
        max_actors=high if high is not None and low is not None and high > low else None,
    )


def ray_remote_args(stage: StageLayout) -> dict[str, Any]:
    """The Ray actor options of one stage's actors (``map_batches(**ray_remote_args(stage))``).

    ``num_gpus`` and ``num_cpus`` always; ``accelerator_type`` and ``label_selector`` only when the
    stage is pinned to node types, so an unpinned job runs on any cluster.
    """
    args: dict[str, Any] = {"num_gpus": stage.num_gpus, "num_cpus": stage.num_cpus}
    if stage.placement.accelerator_type:
        args["accelerator_type"] = stage.placement.accelerator_type
    if stage.placement.label_selector:
        args["label_selector"] = dict(stage.placement.label_selector)
    return args


def node_accepts(placement: StagePlacement, *, labels: Mapping[str, str]) -> bool:
    """Whether a node with these Ray labels may host the stage (accelerator type read from its label)."""
    if placement.accelerator_type and labels.get(ACCELERATOR_LABEL) != placement.accelerator_type:
        return False
    return all(_selector_matches(value, labels.get(key)) for key, value in placement.label_selector.items())


def _selector_matches(selector: str, value: str | None) -> bool:
    negate = selector.startswith("!")
    body = selector[1:] if negate else selector
    if body.startswith("in(") and body.endswith(")"):
        allowed = {item.strip() for item in body[3:-1].split(",")}
    else:
        allowed = {body}
    return (value in allowed) != negate


def parse_labels(pairs: list[str], *, flag: str) -> dict[str, str]:
    """``["key=value", ...]`` -> ``{key: value}``; ValueError naming ``flag`` for a malformed pair."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{flag} expects KEY=VALUE (e.g. {STAGE_LABEL}=decoder), got {pair!r}")
        labels[key.strip()] = value.strip()
    return labels


def fit_cpus(stages: list[StageLayout], *, cluster_cpus: float) -> list[StageLayout]:
    """Scale the stages' CPU reservations down to fit ``cluster_cpus`` when together they ask for more.

    Ray's CPUs are a logical reservation: actors of a chain that cannot all be placed at once
    would leave a stage without actors and the job waiting forever (e.g. depth + prior + decoder,
    one CPU each, on a 2-CPU laptop). GPUs are never scaled (`resolve_stages` refuses those).
    """
    needed = sum(stage.num_actors * stage.num_cpus for stage in stages)
    if needed <= cluster_cpus + 1e-9 or needed == 0:
        return stages
    factor = cluster_cpus / needed
    # Round down to 1/100 CPU so that rounding never makes the sum exceed the cluster.
    return [dataclasses.replace(s, num_cpus=math.floor(s.num_cpus * factor * 100) / 100) for s in stages]
