"""Mapping from the job's stage settings to Ray resources (actors, GPUs, CPUs per stage) and node types."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.config import StageResources

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
class StagePlan:
    """Resolved resources of one stage: every field concrete."""

    num_actors: int
    num_gpus: float
    num_cpus: float
    placement: StagePlacement = field(default_factory=StagePlacement)


def resolve_stages(
    prior: StageResources,
    decoder: StageResources,
    *,
    cluster_gpus: float,
    depth: StageResources | None = None,
) -> tuple[StagePlan, StagePlan, StagePlan | None]:
    """Fill the ``None`` fields of the stage settings from the cluster's GPU count.

    Defaults: on a CPU-only cluster, one actor per stage and no GPUs. With one GPU, prior and
    decoder share it (0.5 each). With G >= 2 GPUs, one prior actor on its own GPU and G - 1
    decoder actors with one GPU each (the prior is ~4% of the decoder's compute, KANDINSKY_NOTES.md).
    The optional depth stage (ControlNet hints) defaults to one CPU actor; GPUs it is given are
    taken before the decoders'. Raises ValueError when the stages ask for more GPUs than the
    cluster has.
    """
    depth_plan = None
    depth_gpus_total = 0.0
    if depth is not None:
        depth_plan = StagePlan(
            num_actors=depth.num_actors or 1, num_gpus=depth.num_gpus or 0.0, num_cpus=depth.num_cpus
        )
        depth_gpus_total = depth_plan.num_actors * depth_plan.num_gpus
    shared = 0 < cluster_gpus < 2
    default_gpus = 0.0 if cluster_gpus == 0 else (0.5 if shared else 1.0)
    prior_gpus = default_gpus if prior.num_gpus is None else prior.num_gpus
    decoder_gpus = default_gpus if decoder.num_gpus is None else decoder.num_gpus
    num_priors = prior.num_actors or 1
    if decoder.num_actors is not None:
        num_decoders = decoder.num_actors
    elif decoder_gpus > 0:
        free = cluster_gpus - num_priors * prior_gpus - depth_gpus_total
        num_decoders = max(1, math.floor(free / decoder_gpus + 1e-9))
    else:
        num_decoders = 1
    needed = num_priors * prior_gpus + num_decoders * decoder_gpus + depth_gpus_total
    if needed > cluster_gpus + 1e-9:
        raise ValueError(
            f"the stages ask for {needed:g} GPUs ({num_priors} prior x {prior_gpus:g} + "
            f"{num_decoders} decoder x {decoder_gpus:g} + depth {depth_gpus_total:g}) "
            f"but the cluster has {cluster_gpus:g}"
        )
    return (
        StagePlan(num_actors=num_priors, num_gpus=prior_gpus, num_cpus=prior.num_cpus),
        StagePlan(num_actors=num_decoders, num_gpus=decoder_gpus, num_cpus=decoder.num_cpus),
        depth_plan,
    )


def place_stages(
    prior: StagePlan, decoder: StagePlan, *, stage_placement: Mapping[str, Mapping[str, Any]]
) -> tuple[StagePlan, StagePlan]:
    """The two stages with the placement of ``JobConfig.stage_placement`` (missing stage: anywhere)."""
    return (
        dataclasses.replace(prior, placement=StagePlacement(**stage_placement.get("prior", {}))),
        dataclasses.replace(decoder, placement=StagePlacement(**stage_placement.get("decoder", {}))),
    )


def ray_remote_args(stage: StagePlan) -> dict[str, Any]:
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
