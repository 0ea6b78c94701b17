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
class StageLayout:
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
    score: StageResources | None = None,
) -> tuple[StageLayout, StageLayout, StageLayout | None]:
    """Fill the ``None`` fields of the stage settings from the cluster's GPU count.

    With a scoring stage (``score``; see `resolve_score`) the decoders leave each GPU a quarter for
    it: decoders 0.75 GPU each (0.5 of a single GPU, the prior and scorer 0.25 of it).

    Defaults: on a CPU-only cluster, one actor per stage and no GPUs. With one GPU, prior and
    decoder share it (0.5 each). With G >= 2 GPUs, one prior actor on its own GPU and G - 1
    decoder actors with one GPU each (the prior is ~4% of the decoder's compute: docs/architecture.md).
    The optional depth stage (ControlNet hints) defaults to one CPU actor; GPUs it is given are
    taken before the decoders'. Raises ValueError when the stages ask for more GPUs than the
    cluster has.
    """
    depth_plan = None
    depth_gpus_total = 0.0
    if depth is not None:
        depth_plan = StageLayout(
            num_actors=depth.num_actors or 1, num_gpus=depth.num_gpus or 0.0, num_cpus=depth.num_cpus
        )
        depth_gpus_total = depth_plan.num_actors * depth_plan.num_gpus
    shared = 0 < cluster_gpus < 2
    default_gpus = 0.0 if cluster_gpus == 0 else (0.5 if shared else 1.0)
    prior_default, decoder_default = default_gpus, default_gpus
    if score is not None and cluster_gpus:
        prior_default, decoder_default = (0.25, 0.5) if shared else (1.0, 0.75)
    prior_gpus = prior_default if prior.num_gpus is None else prior.num_gpus
    decoder_gpus = decoder_default if decoder.num_gpus is None else decoder.num_gpus
    num_priors = prior.num_actors or 1
    if decoder.num_actors is not None:
        num_decoders = decoder.num_actors
    elif decoder_gpus > 0:
        free = cluster_gpus - num_priors * prior_gpus - depth_gpus_total
        # Each decoder keeps a whole GPU's worth, less the scorer's quarter: one decoder per GPU left.
        per_decoder = 1.0 if decoder.num_gpus is None and score is not None and not shared else decoder_gpus
        num_decoders = max(1, math.floor(free / per_decoder + 1e-9))
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
        StageLayout(num_actors=num_priors, num_gpus=prior_gpus, num_cpus=prior.num_cpus),
        StageLayout(num_actors=num_decoders, num_gpus=decoder_gpus, num_cpus=decoder.num_cpus),
        depth_plan,
    )


def resolve_score(score: StageResources, *, num_decoders: int, cluster_gpus: float) -> StageLayout:
    """The scoring pool (``--score``): by default 0.25 GPU per actor, beside the decoders' 0.75, and one
    actor per four decoders (at least one); on a CPU cluster one CPU actor."""
    if not cluster_gpus:
        return StageLayout(num_actors=score.num_actors or 1, num_gpus=score.num_gpus or 0.0, num_cpus=score.num_cpus)
    num_actors = score.num_actors or min(num_decoders, max(1, -(-num_decoders // 4)))
    num_gpus = 0.25 if score.num_gpus is None else score.num_gpus
    return StageLayout(num_actors=num_actors, num_gpus=num_gpus, num_cpus=score.num_cpus)


def resolve_writer(writer: StageResources, *, num_decoders: int) -> StageLayout:
    """The writer pool: ``writer.num_actors`` (default: one per two decoder actors, at least one), CPU only.

    A writer encodes PNGs (~0.1 s per 768x768 image on one core) and uploads shards; a decoder GPU
    renders an image in ~0.5 s, so one writer core keeps up with several decoders.
    """
    if writer.num_gpus:
        raise ValueError(f"writers encode and upload on CPUs; writer GPUs must be 0, got {writer.num_gpus}")
    return StageLayout(
        num_actors=writer.num_actors or max(1, -(-num_decoders // 2)), num_gpus=0.0, num_cpus=writer.num_cpus
    )


def place_stages(
    prior: StageLayout, decoder: StageLayout, *, stage_placement: Mapping[str, Mapping[str, Any]]
) -> tuple[StageLayout, StageLayout]:
    """The two stages with the placement of ``JobConfig.stage_placement`` (missing stage: anywhere)."""
    return (
        dataclasses.replace(prior, placement=StagePlacement(**stage_placement.get("prior", {}))),
        dataclasses.replace(decoder, placement=StagePlacement(**stage_placement.get("decoder", {}))),
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


@dataclass(frozen=True, kw_only=True)
class StageSuggestion:
    """Actors per stage suggested from measured per-image stage costs, with the throughput it predicts."""

    num_prior_actors: int
    num_decoder_actors: int
    prior_gpus: float
    decoder_gpus: float
    images_per_s: float  # predicted, whole cluster
    decoder_busy: float  # predicted fraction of decoder time spent rendering
    note: str
    num_score_actors: int = 0  # with a scoring stage: actors of `score_gpus` each that keep up with the decoders
    score_gpus: float = 0.0

    def flags(self) -> str:
        """The render flags that ask for this layout."""
        flags = (
            f"--num-prior-actors {self.num_prior_actors} --num-decoder-actors {self.num_decoder_actors} "
            f"--prior-gpus {self.prior_gpus:g} --decoder-gpus {self.decoder_gpus:g}"
        )
        if self.num_score_actors:
            flags += f" --num-score-actors {self.num_score_actors} --score-gpus {self.score_gpus:g}"
        return flags


def priors_needed(*, num_decoders: int, prior_seconds: float, decoder_seconds: float, headroom: float = 1.1) -> int:
    """Prior actors that keep ``num_decoders`` decoders fed, with ``headroom`` spare prior capacity.

    ``*_seconds`` are busy seconds per image of one actor of each stage (at its batch size).
    """
    if prior_seconds < 0 or decoder_seconds <= 0:
        raise ValueError(f"stage costs must be positive, got prior {prior_seconds} s, decoder {decoder_seconds} s")
    return max(1, math.ceil(num_decoders * prior_seconds * headroom / decoder_seconds - 1e-9))


def suggest_stages(
    *,
    prior_seconds: float,
    decoder_seconds: float,
    cluster_gpus: float,
    headroom: float = 1.1,
    score_seconds: float | None = None,
) -> StageSuggestion:
    """`suggest_prior_decoder`, plus the scoring stage when ``score_seconds`` (its busy seconds per image) is given.

    Scorers sit beside the decoders (0.25 GPU each, decoders 0.75; on one GPU prior 0.25, decoder
    0.5, scorer 0.25), as many as keep up with the decoders with ``headroom``.
    """
    base = suggest_prior_decoder(
        prior_seconds=prior_seconds, decoder_seconds=decoder_seconds, cluster_gpus=cluster_gpus, headroom=headroom
    )
    if not score_seconds:
        return base
    needed = max(1, math.ceil(base.num_decoder_actors * score_seconds * headroom / decoder_seconds - 1e-9))
    shared = cluster_gpus < 2
    note = f"{base.note}; scoring costs {score_seconds / decoder_seconds:.1%} of a decoder's time per image"
    return dataclasses.replace(
        base,
        num_score_actors=min(needed, base.num_decoder_actors) if cluster_gpus else 1,
        score_gpus=0.25 if cluster_gpus else 0.0,
        prior_gpus=0.25 if shared and cluster_gpus else base.prior_gpus,
        decoder_gpus=(0.5 if shared else 0.75) if cluster_gpus else base.decoder_gpus,
        note=note,
    )


def suggest_prior_decoder(
    *, prior_seconds: float, decoder_seconds: float, cluster_gpus: float, headroom: float = 1.1
) -> StageSuggestion:
    """Split ``cluster_gpus`` whole GPUs between prior and decoder actors for the most images per second.

    With one GPU (or less) both stages share it (0.5 each) and take turns. With G >= 2 GPUs every
    actor has a GPU of its own: P priors and G - P decoders, P as small as keeps the decoders fed
    with ``headroom`` spare prior capacity, so that in steady state a decoder never waits. Costs are
    busy seconds per image of one actor (e.g. the mean ``prior_seconds`` / ``decoder_seconds`` of a
    previous run's results, which `measured_costs` reads). Raises ValueError for impossible inputs.
    """
    if prior_seconds < 0 or decoder_seconds <= 0:
        raise ValueError(f"stage costs must be positive, got prior {prior_seconds} s, decoder {decoder_seconds} s")
    if cluster_gpus < 2:
        rate = (cluster_gpus or 1.0) / (prior_seconds + decoder_seconds)
        share = 0.5 * cluster_gpus if cluster_gpus else 0.0
        return StageSuggestion(
            num_prior_actors=1,
            num_decoder_actors=1,
            prior_gpus=share,
            decoder_gpus=share,
            images_per_s=rate,
            decoder_busy=decoder_seconds / (prior_seconds + decoder_seconds),
            note="one GPU: prior and decoder share it and take turns"
            if cluster_gpus
            else "no GPUs: prior and decoder share the CPUs",
        )
    gpus = int(cluster_gpus)
    best: tuple[float, int] | None = None
    for num_priors in range(1, gpus):
        num_decoders = gpus - num_priors
        fed = num_priors / (prior_seconds * headroom) if prior_seconds else math.inf
        rate = min(fed, num_decoders / decoder_seconds)
        if best is None or rate > best[0] + 1e-12:
            best = (rate, num_priors)
    rate, num_priors = best
    num_decoders = gpus - num_priors
    decoder_busy = min(1.0, rate * decoder_seconds / num_decoders)
    prior_busy = rate * prior_seconds / num_priors
    shared = gpus / (prior_seconds + decoder_seconds)
    note = f"{num_priors} prior GPU(s) {prior_busy:.0%} busy feed {num_decoders} decoder GPU(s) {decoder_busy:.0%} busy"
    if shared > rate * 1.05:
        note += (
            f"; the prior is cheap: co-locating it (e.g. --prior-gpus 0.1 --decoder-gpus 0.9, {gpus} decoders) "
            f"could reach ~{shared:.3g} images/s"
        )
    return StageSuggestion(
        num_prior_actors=num_priors,
        num_decoder_actors=num_decoders,
        prior_gpus=1.0,
        decoder_gpus=1.0,
        images_per_s=rate,
        decoder_busy=decoder_busy,
        note=note,
    )


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
