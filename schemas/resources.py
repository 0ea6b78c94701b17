"""One stage's actors and Ray resources (`StageResources`): a fixed pool (``N``) or bounds (``MIN:MAX``), GPUs and
CPUs per actor; ``None`` fields are decided from the cluster when the job starts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from schemas.numbers import check_range

# What --help says of an option whose default the job chooses for the machine it finds (cluster/defaults.py).
MACHINE_DEFAULT = "chosen for the machine when the job starts, printed with its reason"

UNBOUNDED = 1_000_000  # an actor pool's upper bound when none is given ("MIN:")
# GPU memory the CLIP group takes when it shares a GPU with a decoder: its fp16 weights (prior 7.1 GB with its
# encoders; the depth estimator ~1.3 GB) and activations. The decoder gets the rest.
CLIP_MEMORY_BYTES = 10e9
MEMORY_ROLES = ("clip", "decoder")
MAX_RESOURCES_PER_ACTOR = 1024  # GPUs or CPUs one actor may ask for


_ACTOR_COUNT = re.compile(r"(\d+)(?:\s*:\s*(\d*))?")


def actor_count(text: str) -> str:
    """``--num-{stage}-actors`` as given on the command line or in a file: ``N`` or ``MIN:MAX`` (the numbers are
    checked with the rest of the config, by `parse_actor_count`)."""
    text = str(text).strip()
    if _ACTOR_COUNT.fullmatch(text) is None:
        raise ValueError(f"expected N or MIN:MAX (e.g. 4, 2:8, 1:), got {text!r}")
    return text


def parse_actor_count(text: str) -> str:
    """``--num-{stage}-actors``: ``N`` (a fixed pool) or ``MIN:MAX`` (``MIN:``: no upper bound), normalized."""
    text = str(text).strip()
    match = _ACTOR_COUNT.fullmatch(text)
    if match is None:
        raise ValueError(f"num_actors must be N or MIN:MAX (e.g. 4, 2:8, 1:), got {text!r}")
    low, sep, high = match.group(1), ":" in text, match.group(2)
    if not sep:
        if int(low) < 1:
            raise ValueError(f"num_actors must be >= 1 for a fixed pool, got {text!r}")
        return str(int(low))
    if high and int(high) < max(int(low), 1):
        raise ValueError(f"num_actors MIN:MAX needs MAX >= MIN and MAX >= 1, got {text!r}")
    return f"{int(low)}:{int(high) if high else ''}"


@dataclass(frozen=True, kw_only=True)
class StageResources:
    """Actors and Ray resources of one model stage. ``None`` means: decided from the cluster.

    ``num_actors`` is ``N`` (a fixed pool) or ``MIN:MAX``: MIN actors at once, more while work waits
    and a node can hold another, up to MAX (``MIN:``: as many as the cluster holds); idle ones above
    MIN go. An int is taken as ``N``. Flags are per stage: ``{stage}`` is the JobConfig field's name
    (or its ``stage`` metadata) and ``{what}`` its ``what`` metadata (default: the stage).
    """

    num_actors: str | None = field(
        default=None,
        metadata={
            "flag": "--num-{stage}-actors",
            "parse": actor_count,  # the numbers are checked and normalized by `parse_actor_count` in __post_init__
            "metavar": "N|MIN:MAX",
            "help": "{what} actors: N, or MIN:MAX to grow from MIN to MAX as nodes join (MIN: no upper bound)",
            "group": "execution",
        },
    )
    num_gpus: float | None = field(
        default=None, metadata={"flag": "--{stage}-gpus", "help": "GPUs per {what} actor", "group": "execution"}
    )
    num_cpus: float | None = field(
        default=None,
        metadata={
            "flag": "--{stage}-cpus",
            "help": "CPUs per {what} actor (on CPU also its torch threads)",
            "default_help": MACHINE_DEFAULT,
            "group": "execution",
        },
    )

    def __post_init__(self) -> None:
        if self.num_actors is not None:
            if isinstance(self.num_actors, bool) or not isinstance(self.num_actors, (int, str)):
                raise ValueError(f"num_actors must be N or MIN:MAX, got {self.num_actors!r}")
            object.__setattr__(self, "num_actors", parse_actor_count(str(self.num_actors)))
        check_range("num_gpus", self.num_gpus, low=0, high=MAX_RESOURCES_PER_ACTOR)
        check_range("num_cpus", self.num_cpus, low=0, high=MAX_RESOURCES_PER_ACTOR)

    @property
    def min_actors(self) -> int | None:
        """Actors started at once (and kept), or None when unset."""
        return None if self.num_actors is None else int(self.num_actors.split(":")[0])

    @property
    def max_actors(self) -> int | None:
        """The most actors the pool may grow to (`UNBOUNDED` for ``MIN:``), or None when unset."""
        if self.num_actors is None:
            return None
        low, _, high = self.num_actors.partition(":")
        return int(low) if ":" not in self.num_actors else (int(high) if high else UNBOUNDED)


def co_located_memory_fraction(role: str, total_bytes: float) -> float:
    """The share of a GPU's memory (``total_bytes``) an actor that shares the GPU may allocate (torch's
    ``set_per_process_memory_fraction``): the CLIP group what its models need (`CLIP_MEMORY_BYTES`, at least 10%,
    at most half), the decoder the rest, so a spike of one never takes the other's memory."""
    if role not in MEMORY_ROLES:
        raise ValueError(f"memory role must be one of {MEMORY_ROLES}, got {role!r}")
    clip = min(0.5, max(0.1, CLIP_MEMORY_BYTES / total_bytes)) if total_bytes > 0 else 0.5
    return clip if role == "clip" else 1.0 - clip
