"""Stage layouts on GPUs: which actors serve which stages on how much of a GPU, and the images/s each layout yields.

Two GPU sets. Set A, the CLIP GPUs, runs every CLIP-family stage in one actor group (``clip``): the
prior (text, image-guided, interpolation), CLIP scoring (the prior checkpoint's own encoders, loaded
once) and depth estimation. Set B runs only decoders (UNet + MoVQ). How big set A is follows from
the stages' measured (or estimated) costs per image:

- ``dedicated``: k whole GPUs for the CLIP group, the rest for decoders; images/s =
  min(k / clip, (N - k) / decoder) for per-image costs ``clip`` and ``decoder`` on one GPU;
- ``co-located``: a decoder on every GPU, and m CLIP actors each beside a decoder on a GPU share
  (`CLIP_SHARE` of a GPU, logical: Ray does not isolate compute); the GPUs time-slice, which loses
  some time (`COLOCATION_EFFICIENCY`), so images/s = (N - m (1 - e)) / (clip + decoder) with m as
  small as feeds the decoders.

At 768x768 and 50 decoder steps the CLIP work is ~4% of a decoder's, so on 2-8 GPUs a dedicated
CLIP GPU would idle most of the time (2 GPUs: half the cluster) and co-location wins; on large
clusters both are within a few percent and the dedicated layout (whole GPUs, no time-slicing, the
CLIP group's 7 GB of weights off the decoders' GPUs) is kept unless co-location predicts clearly more.
`sweep` lists every alternative; `choose` picks the default; `benchmark layout` compares them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from schemas.stages import DECODER, PRIOR

# Logical GPU share of a CLIP actor beside a decoder (the decoder gets the rest). Memory decides what
# fits (the CLIP group holds ~7.1 GB of fp16 weights, a decoder ~2.65 GB plus its batch), not this number.
CLIP_SHARE = 0.1
# Throughput kept when two processes time-slice one GPU: an estimate until measured on a GPU.
COLOCATION_EFFICIENCY = 0.9
# Co-location must predict this much more than the dedicated layout before it is chosen.
COLOCATION_MARGIN = 1.03
# Spare capacity the CLIP group keeps, so a decoder never waits for an embedding.
HEADROOM = 1.1

CLIP_GROUP = "clip"
DECODER_GROUP = "decoder"
MODEL_GROUP = "model"  # CPU clusters: every model stage in one process per core


@dataclass(frozen=True, kw_only=True)
class StageCosts:
    """Busy seconds per image of the run, for one actor holding a whole GPU, per model stage.

    ``depth`` and ``score`` are per image of the run (0 when the run has no such stage; depth is
    weighted by the share of images that need an estimated hint). ``source`` says where they come from.
    """

    prior: float
    decoder: float
    score: float = 0.0
    depth: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.decoder <= 0 or min(self.prior, self.score, self.depth) < 0:
            raise ValueError(f"stage costs must be >= 0 (decoder > 0), got {self}")

    @property
    def clip(self) -> float:
        """Seconds of CLIP-group work per image: prior, scoring and depth."""
        return self.prior + self.score + self.depth


@dataclass(frozen=True, kw_only=True)
class ActorGroup:
    """One kind of actor: the stages each one serves, how many there are, and what each reserves."""

    name: str
    stages: tuple[str, ...]
    num_actors: int
    num_gpus: float
    num_cpus: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A way to run the model stages on ``num_gpus`` GPUs, and what it is predicted to yield.

    ``busy``: the predicted busy share of each GPU set (``clip`` and ``decoder`` GPUs, or ``shared``
    for GPUs both use), so ``1 - busy`` is its idle share.
    """

    kind: str  # "dedicated", "co-located" or "cpu"
    groups: tuple[ActorGroup, ...]
    num_gpus: int
    images_per_s: float
    busy: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def group(self, name: str) -> ActorGroup | None:
        """The group called ``name``, if the layout has it."""
        return next((group for group in self.groups if group.name == name), None)

    @property
    def images_per_s_per_gpu(self) -> float:
        """Predicted images/s per reserved GPU."""
        return self.images_per_s / self.num_gpus if self.num_gpus else self.images_per_s

    def flags(self) -> str:
        """The render flags that ask for this layout."""
        clip, decoder = self.group(CLIP_GROUP), self.group(DECODER_GROUP)
        flags = f"--layout {self.kind}"
        for stage, group in ((PRIOR, clip), (DECODER, decoder)):
            if group is not None:
                flags += f" {stage.flag('actors')} {group.num_actors} {stage.flag('gpus')} {group.num_gpus:g}"
        return flags

    def describe(self) -> str:
        """``co-located: 8 decoder x 0.9 GPU, 1 clip (prior, score) x 0.1 GPU``."""
        groups = ", ".join(f"{g.num_actors} {g.name} ({', '.join(g.stages)}) x {g.num_gpus:g} GPU" for g in self.groups)
        return f"{self.kind}: {groups}"


def dedicated(*, num_gpus: int, num_clip_gpus: int, costs: StageCosts, clip_stages: tuple[str, ...]) -> Layout:
    """``num_clip_gpus`` whole GPUs for the CLIP group, every other GPU a decoder."""
    if not 1 <= num_clip_gpus < num_gpus:
        raise ValueError(f"a dedicated layout needs 1 <= CLIP GPUs < {num_gpus} GPUs, got {num_clip_gpus}")
    num_decoders = num_gpus - num_clip_gpus
    fed = num_clip_gpus / costs.clip if costs.clip else math.inf
    rate = min(fed, num_decoders / costs.decoder)
    return Layout(
        kind="dedicated",
        groups=(
            ActorGroup(name=CLIP_GROUP, stages=clip_stages, num_actors=num_clip_gpus, num_gpus=1.0),
            ActorGroup(name=DECODER_GROUP, stages=("decoder",), num_actors=num_decoders, num_gpus=1.0),
        ),
        num_gpus=num_gpus,
        images_per_s=rate,
        busy={CLIP_GROUP: rate * costs.clip / num_clip_gpus, DECODER_GROUP: rate * costs.decoder / num_decoders},
    )


def co_located(
    *,
    num_gpus: int,
    num_clip_actors: int,
    costs: StageCosts,
    clip_stages: tuple[str, ...],
    efficiency: float = COLOCATION_EFFICIENCY,
) -> Layout:
    """A decoder on every GPU (``1 - CLIP_SHARE`` each) and ``num_clip_actors`` CLIP actors beside decoders.

    ``efficiency``: the share of a GPU's time two processes keep between them (1: no loss).
    """
    if not 1 <= num_clip_actors <= num_gpus:
        raise ValueError(f"a co-located layout needs 1 <= CLIP actors <= {num_gpus} GPUs, got {num_clip_actors}")
    # GPUs with two processes lose (1 - e) of their time; the CLIP work of each image is spread over m of them.
    capacity = num_gpus - num_clip_actors * (1 - efficiency)
    rate = capacity / (costs.clip + costs.decoder)
    if costs.clip:  # one CLIP actor can use at most the efficient part of its GPU
        rate = min(rate, num_clip_actors * efficiency / costs.clip)
    return Layout(
        kind="co-located",
        groups=(
            ActorGroup(name=CLIP_GROUP, stages=clip_stages, num_actors=num_clip_actors, num_gpus=CLIP_SHARE),
            ActorGroup(name=DECODER_GROUP, stages=("decoder",), num_actors=num_gpus, num_gpus=1 - CLIP_SHARE),
        ),
        num_gpus=num_gpus,
        images_per_s=rate,
        busy={"shared": rate * (costs.clip + costs.decoder) / num_gpus},
    )


def sweep(*, num_gpus: int, costs: StageCosts, clip_stages: tuple[str, ...] = ("prior",)) -> list[Layout]:
    """Every layout of the model stages on ``num_gpus`` GPUs: dedicated with 1..N-1 CLIP GPUs, co-located with
    1..N CLIP actors; best first (by predicted images/s)."""
    if num_gpus < 1:
        raise ValueError(f"a GPU layout needs at least one GPU, got {num_gpus}")
    layouts = [
        dedicated(num_gpus=num_gpus, num_clip_gpus=k, costs=costs, clip_stages=clip_stages) for k in range(1, num_gpus)
    ]
    layouts += [
        co_located(num_gpus=num_gpus, num_clip_actors=m, costs=costs, clip_stages=clip_stages)
        for m in range(1, num_gpus + 1)
    ]
    return sorted(layouts, key=lambda layout: -layout.images_per_s)


def choose(*, num_gpus: int, costs: StageCosts, clip_stages: tuple[str, ...] = ("prior",)) -> Layout:
    """The default layout: the fewest CLIP GPUs (or actors) that keep the decoders fed with `HEADROOM`.

    Dedicated unless co-location predicts at least `COLOCATION_MARGIN` times its images/s (always so
    on one GPU, where nothing else fits). The note says which and why.
    """
    ratio = costs.clip / costs.decoder
    share = f"the CLIP work (prior{', scoring' if costs.score else ''}{', depth' if costs.depth else ''}) is "
    share += f"{ratio:.1%} of a decoder's per image ({costs.source or 'given costs'})"
    if num_gpus < 2:
        layout = co_located(num_gpus=num_gpus, num_clip_actors=1, costs=costs, clip_stages=clip_stages)
        return _noted(layout, f"one GPU: the CLIP group shares it with the decoder; {share}")
    # The fewest CLIP GPUs / actors whose capacity, less the headroom, feeds the most decoder work.
    best_k = max(range(1, num_gpus), key=lambda k: (_fed(k, 1.0, costs, num_gpus - k, 0), -k))
    split = dedicated(num_gpus=num_gpus, num_clip_gpus=best_k, costs=costs, clip_stages=clip_stages)
    best_m = max(range(1, num_gpus + 1), key=lambda m: (_fed(m, COLOCATION_EFFICIENCY, costs, num_gpus, m), -m))
    shared = co_located(num_gpus=num_gpus, num_clip_actors=best_m, costs=costs, clip_stages=clip_stages)
    gain = shared.images_per_s / split.images_per_s - 1
    if shared.images_per_s >= COLOCATION_MARGIN * split.images_per_s:
        why = (
            f"{share}: {best_k} dedicated CLIP GPU(s) would be {split.busy[CLIP_GROUP]:.0%} busy, so "
            f"{best_m} CLIP actor(s) share decoder GPUs ({gain:+.0%} images/s)"
        )
        return _noted(shared, why)
    why = (
        f"{share}: {best_k} CLIP GPU(s) {split.busy[CLIP_GROUP]:.0%} busy feed {num_gpus - best_k} decoder GPU(s) "
        f"{split.busy[DECODER_GROUP]:.0%} busy (co-locating would give {gain:+.1%})"
    )
    return _noted(split, why)


def _fed(num_clip: int, efficiency: float, costs: StageCosts, num_decoders: int, num_shared: int) -> float:
    """Images/s with ``num_clip`` CLIP actors (each ``efficiency`` of a GPU, less `HEADROOM`) feeding
    ``num_decoders`` decoders, ``num_shared`` of which share their GPU with a CLIP actor."""
    clip = num_clip * efficiency / (costs.clip * HEADROOM) if costs.clip else math.inf
    if num_shared:
        return min(clip, (num_decoders - num_shared * (1 - efficiency)) / (costs.clip + costs.decoder))
    return min(clip, num_decoders / costs.decoder)


def _noted(layout: Layout, note: str) -> Layout:
    return Layout(**{**layout.__dict__, "note": note})
