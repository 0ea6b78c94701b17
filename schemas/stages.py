"""The stages of a render job, in order: one declared table that the chain, dry run, resources, stats and writer read.

A shard's images go through the model stages in this order ([depth] -> prior -> decoder ->
[score]) and then to a writer, the sink that publishes the shard. Everything that names a stage,
walks the stages in order, or maps a stage to its settings, flags or results columns reads `STAGES`.
"""

from __future__ import annotations

from dataclasses import dataclass

# When an optional stage is part of a run.
ALWAYS = "always"
WHEN_DEPTH = "when some ControlNet row lacks a hint"
WHEN_SCORE = "with --score"


@dataclass(frozen=True, kw_only=True)
class StageInfo:
    """One stage of the chain.

    ``name``: what logs, stats.json and the dry run call it, and the ``{name}`` of its flags
    (``--num-{name}-actors``, ``--{name}-gpus``, ``--{name}-cpus``). ``config_field``: the
    `schemas.config.JobConfig` field holding its `StageResources`. ``timed``: its per-image busy
    seconds go to the results column ``{name}_seconds`` (model stages). ``sink``: the writer, which
    takes every batch of a shard and publishes it. ``present``: when a run has the stage.
    """

    name: str
    config_field: str
    description: str
    timed: bool = False
    sink: bool = False
    present: str = ALWAYS

    @property
    def seconds_column(self) -> str:
        """The results column holding an image's share of this stage's call time."""
        return f"{self.name}_seconds"

    def flag(self, option: str) -> str:
        """This stage's flag for ``option``: ``cpus`` -> ``--{name}-cpus``, ``actors`` -> ``--num-{name}-actors``."""
        return f"--num-{self.name}-actors" if option == "actors" else f"--{self.name}-{option}"

    def in_run(self, *, needs_depth: bool, score: bool) -> bool:
        """Whether a run with these needs has this stage."""
        return {ALWAYS: True, WHEN_DEPTH: needs_depth, WHEN_SCORE: score}[self.present]


DEPTH = StageInfo(
    name="depth", config_field="depth", description="depth maps for ControlNet rows without a hint", present=WHEN_DEPTH
)
PRIOR = StageInfo(
    name="prior", config_field="prior", description="prompts and images -> CLIP image embeddings", timed=True
)
DECODER = StageInfo(
    name="decoder", config_field="decoder", description="embeddings -> pixels (UNet + MoVQ)", timed=True
)
SCORE = StageInfo(
    name="score", config_field="scorer", description="CLIP score of each image", timed=True, present=WHEN_SCORE
)
WRITER = StageInfo(name="writer", config_field="writer", description="PNG encoding, shard files, results", sink=True)

STAGES: tuple[StageInfo, ...] = (DEPTH, PRIOR, DECODER, SCORE, WRITER)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
MODEL_STAGES = tuple(stage for stage in STAGES if not stage.sink)
TIMED_STAGES = tuple(stage.name for stage in STAGES if stage.timed)  # prior, decoder, score
# Stages up to this one see a group of batches per call (one prior call serves several decoder batches).
SPLIT_AFTER = PRIOR.name
