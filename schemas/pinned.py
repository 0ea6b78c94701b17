"""What decides an output's pixels, pinned in its ``_dataset.json`` beside the manifest, format and shard rows.

The first run on an output records where each model loads from (the model flags, for a resume with ``--output``
alone), each checkpoint's identity (`jobs.planning.identity`: its source and content id, added as runs use more
checkpoints), the dtype, every job-wide default a row can inherit (`schemas.manifest.RenderDefaults`) and the job
seed (rows without a seed derive theirs from it). A later run that leaves a flag out takes the pinned value; one
that gives another value, or whose checkpoint's content changed, is refused before any model loads, unless it
passes ``--mixed-output``: then the new values are pinned and the run is recorded in ``mixed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# JobConfig fields pinned here (`schemas.config.JobConfig.given` names the ones a run set itself).
PINNED_FIELDS = ("models", "dtype", "defaults", "seed")


@dataclass(frozen=True, kw_only=True)
class PixelSettings:
    """The pinned values (see the module docstring)."""

    models: dict[str, str | None]  # ModelPaths fields as the runs gave them (what a resume loads from)
    checkpoints: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"source", "content"}
    dtype: str = "auto"
    defaults: dict[str, Any] = field(default_factory=dict)  # RenderDefaults fields
    seed: int = 0
    mixed: list[dict[str, Any]] = field(default_factory=list)  # runs that changed a pinned value: run_id, changes


def changes(pinned: PixelSettings, wanted: PixelSettings) -> list[str]:
    """What ``wanted`` changes of ``pinned``, one line each (flag-like names): the dtype, each default, the seed,
    and each checkpoint both name whose content differs. Model paths may differ (a moved folder): their content
    decides."""
    found = []
    if pinned.dtype != wanted.dtype:
        found.append(f"--dtype: {pinned.dtype} (pinned) vs {wanted.dtype} (this run)")
    for name in sorted(set(pinned.defaults) | set(wanted.defaults)):
        old, new = pinned.defaults.get(name), wanted.defaults.get(name)
        if old != new and old is not None and new is not None:
            found.append(f"--{name.replace('_', '-')}: {old} (pinned) vs {new} (this run)")
    if pinned.seed != wanted.seed:
        found.append(f"--seed: {pinned.seed} (pinned) vs {wanted.seed} (this run)")
    for name in sorted(set(pinned.checkpoints) & set(wanted.checkpoints)):
        old, new = pinned.checkpoints[name], wanted.checkpoints[name]
        if old.get("content") != new.get("content"):
            found.append(
                f"checkpoint {name}: {old.get('source')} @ {old.get('content')} (pinned) vs "
                f"{new.get('source')} @ {new.get('content')} (this run)"
            )
    return found
