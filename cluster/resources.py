"""Mapping from the job's stage settings to Ray resources (actors, GPUs, CPUs per stage)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from schemas.config import StageResources


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """Resolved resources of one stage: every field concrete."""

    num_actors: int
    num_gpus: float
    num_cpus: float


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
