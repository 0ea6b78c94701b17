"""The output's pinned pixel settings (`schemas.pinned`) applied to a run: values it left out taken from the
output, values it changed refused (exit status 2) unless ``--mixed-output``, checkpoint contents compared once the
model check has resolved them (`jobs.planning.identity`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from jobs.planning.identity import CheckpointId
from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.manifest import RenderDefaults
from schemas.models import ModelPaths, is_hub_id, is_remote, local_path
from schemas.pinned import PixelSettings, changes
from schemas.text import public_uri

# ModelPaths fields that say where a checkpoint loads from (not where nodes cache copies of it).
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelPaths) if f.name != "cache")
MODEL_FLAGS = {f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in dataclasses.fields(ModelPaths)}

logger = logger_for(__name__)


class PinnedSettingsError(ValueError):
    """A run that would change what the output pinned (its message lists each change and the ways forward)."""


def with_pinned(config: JobConfig, pinned: PixelSettings | None) -> JobConfig:
    """``config`` with the output's pinned values for each pinned field it did not set itself (``config.given``);
    unchanged for a new output. A config built in code (``given`` None) set them all, but ``--dtype auto`` means
    the dtype the output's images were made in whoever asks."""
    if pinned is None:
        return config
    updates: dict = {"dtype": pinned.dtype} if config.dtype == "auto" else {}  # the dtype the images were made in
    if config.given is None:
        return dataclasses.replace(config, **updates)
    given = set(config.given)
    kept = {k: v for k, v in pinned.models.items() if k in MODEL_FIELDS and model_from_pin(config, k)}
    if kept:
        updates["models"] = dataclasses.replace(config.models, **kept)
    if "dtype" not in given:
        updates["dtype"] = pinned.dtype
    if "seed" not in given:
        updates["seed"] = pinned.seed
    known = {f.name for f in dataclasses.fields(RenderDefaults)}
    defaults = {k: v for k, v in pinned.defaults.items() if k in known and f"defaults.{k}" not in given}
    if defaults:
        updates["defaults"] = dataclasses.replace(config.defaults, **defaults)
    return dataclasses.replace(config, **updates)


def model_from_pin(config: JobConfig, name: str) -> bool:
    """Whether checkpoint field ``name`` (a `ModelPaths` field) of a run on a pinned output comes from the pin: the
    run gave neither ``--models DIR`` (all of them) nor that checkpoint's own flag."""
    return config.given is not None and "models" not in config.given and f"models.{name}" not in config.given


def wanted(config: JobConfig, pinned: PixelSettings | None, ids: Mapping[str, CheckpointId] = {}) -> PixelSettings:
    """What this run would pin: its model flags, dtype, defaults and seed; the checkpoints the output pinned with
    those this run resolved (``ids``) in their place."""
    checkpoints = dict(pinned.checkpoints) if pinned else {}
    checkpoints.update({name: identity.as_dict() for name, identity in ids.items()})
    return PixelSettings(
        models={name: _pinned_path(name, getattr(config.models, name)) for name in MODEL_FIELDS},
        checkpoints=checkpoints,
        dtype=config.dtype,
        defaults=dataclasses.asdict(config.defaults),
        seed=config.seed,
        mixed=list(pinned.mixed) if pinned else [],
    )


def check_pinned(config: JobConfig, pinned: PixelSettings | None, ids: Mapping[str, CheckpointId] = {}) -> list[str]:
    """The pinned values this run changes (empty for a new output); `PinnedSettingsError` listing them and the ways
    forward unless the run accepts a mixed output (``--mixed-output``)."""
    if pinned is None:
        return []
    found = changes(pinned, wanted(config, None, ids))
    if found and not config.mixed_output:
        raise PinnedSettingsError(
            f"{public_uri(config.output)} pinned other values of what decides its images:\n  - "
            + "\n  - ".join(found)
            + "\nLeave those flags out to render with the pinned values (a resume needs only --output), give another "
            "--output for a new dataset, or pass --mixed-output to pin the new values and record this run as mixing "
            "them (results rows name the checkpoints and settings of each image)."
        )
    return found


def settle(
    config: JobConfig, pinned: PixelSettings | None, ids: Mapping[str, CheckpointId], *, rendering: bool
) -> tuple[PixelSettings, list[str]]:
    """(what the output pins after this run, what the run changes of it): `check_pinned` with the checkpoints the
    model check resolved (``ids``), every change listed at once. A run that renders nothing resolves no checkpoint,
    so it cannot compare model flags by content: the output keeps its pinned models, and flags naming others are
    told so once (the next run with something to render checks them)."""
    found = check_pinned(config, pinned, ids)
    settled = wanted(config, pinned, ids)
    if rendering or pinned is None:
        return settled, found
    other = {k: v for k, v in settled.models.items() if v is not None and v != pinned.models.get(k)}
    if other:
        logger.warning(
            "nothing to render, so the model flags of this run were not checked and the output keeps its pinned "
            "models: %s. A run with something to render compares their content with the pinned checkpoints",
            "; ".join(
                f"{MODEL_FLAGS[name]} {value} (pinned: {pinned.models.get(name)})" for name, value in other.items()
            ),
        )
    return dataclasses.replace(settled, models=dict(pinned.models)), found


def _pinned_path(name: str, value: object) -> object:
    """A model flag as pinned: a URI without credentials, a hub id (or the depth model's revision) as given, a local
    folder as an absolute path (so a resume from another working directory loads the same folder)."""
    if not isinstance(value, str) or name == "depth_revision":
        return value
    if is_remote(value) or is_hub_id(value):
        return public_uri(value)
    return os.path.abspath(local_path(value))
