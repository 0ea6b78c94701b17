"""GPU-seconds estimates for ``--dry-run``: per-accelerator calibration profiles and what work costs on one.

A profile holds three numbers, each the busy seconds of one GPU (one actor) per image:

- ``prior_step_seconds``: one prior denoising step, classifier-free guidance on (half when off);
- ``decoder_step_seconds``: one decoder UNet step of a 512x512 image, guidance on (half when off),
  proportional to the pixel count;
- ``decoder_image_seconds``: per 512x512 image, the rest of the decoder call (MoVQ decode), proportional
  to the pixel count (PNG encoding and upload run on the writers' CPUs, not on a GPU);
- ``score_image_seconds`` (optional, 0 when absent): the scoring stage (``--score clip``) per image: the
  CLIP image and text encoders at their fixed 224-pixel input, whatever the output size.

Guidance doubles the batch the model sees, hence the halving when it is off (``guidance_scale <= 1``);
img2img-family modes run ``int(num_inference_steps * strength)`` decoder steps. A profile is fitted
from a finished run's results by ``kandinsky-render calibrate`` (`jobs.reporting.calibrate`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

import cluster
from schemas.manifest import RenderDefaults
from schemas.modes import DEFAULT_MODE, MODES

REFERENCE_PIXELS = 512 * 512
DEFAULT_CALIBRATION = os.path.join(os.path.dirname(os.path.abspath(cluster.__file__)), "calibration.yaml")


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Seconds of one GPU per unit of work on one accelerator type (see module docstring)."""

    name: str
    prior_step_seconds: float
    decoder_step_seconds: float
    decoder_image_seconds: float
    measured: bool
    source: str
    score_image_seconds: float = 0.0


def load_calibration(path: str = DEFAULT_CALIBRATION) -> list[Profile]:
    """Profiles of a calibration YAML file (``profiles: {name: {...}}``); ValueError when malformed."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ValueError(f"calibration file {path}: no such file") from None
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise ValueError(f"calibration file {path}: expected a non-empty 'profiles' mapping")
    loaded = []
    for name, values in profiles.items():
        try:
            loaded.append(
                Profile(
                    name=str(name),
                    prior_step_seconds=float(values["prior_step_seconds"]),
                    decoder_step_seconds=float(values["decoder_step_seconds"]),
                    decoder_image_seconds=float(values["decoder_image_seconds"]),
                    score_image_seconds=float(values.get("score_image_seconds", 0.0)),
                    measured=bool(values.get("measured", False)),
                    source=str(values.get("source", "")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"calibration file {path}: profile {name!r}: {exc!r}") from None
    return loaded


def _guidance_factor(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 1.0, 1.0, 0.5)


def numbers(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` of ``table`` as float64 numpy."""
    return table.column(name).to_numpy().astype(float)


def work_units(table: pa.Table) -> dict[str, np.ndarray]:
    """Per row of a work or results table: prior steps, decoder step-megapixels and megapixels (guidance applied)."""
    scale = numbers(table, "height") * numbers(table, "width") / REFERENCE_PIXELS
    steps = numbers(table, "num_inference_steps")
    # Partial-schedule (img2img-family) pipelines skip the first (1 - strength): int(steps * strength) run.
    partial = pc.is_in(table.column("mode"), value_set=pa.array([m for m in MODES if MODES[m].partial_schedule]))
    partial = partial.to_numpy(zero_copy_only=False).astype(bool)
    steps = np.where(partial, np.floor(steps * numbers(table, "strength")), steps)
    return {
        "scored_images": np.ones(table.num_rows),
        "prior_steps": numbers(table, "prior_num_inference_steps")
        * _guidance_factor(numbers(table, "prior_guidance_scale")),
        "decoder_steps": steps * _guidance_factor(numbers(table, "guidance_scale")) * scale,
        "decoder_images": scale,
    }


def unit_totals(work: pa.Table) -> dict[str, float]:
    """`work_units` summed over planned ``work`` rows (add the totals of several shards to estimate them all)."""
    return {name: float(values.sum()) for name, values in work_units(work).items()}


def estimate(totals: dict[str, float], profile: Profile) -> dict[str, float]:
    """Estimated busy GPU-seconds per stage, on ``profile``, for work of these `unit_totals`."""
    prior = totals["prior_steps"] * profile.prior_step_seconds
    decoder = totals["decoder_steps"] * profile.decoder_step_seconds
    decoder += totals["decoder_images"] * profile.decoder_image_seconds
    score = totals.get("scored_images", 0.0) * profile.score_image_seconds
    return {"prior": prior, "decoder": decoder, "score": score, "total": prior + decoder + score}


def image_seconds(profile: Profile, *, defaults: RenderDefaults, pixels: int) -> dict[str, float]:
    """`estimate` of one text2img image of ``pixels`` pixels whose parameters are ``defaults``."""
    row = {name: [getattr(defaults, name)] for name in ("num_inference_steps", "guidance_scale", "strength")}
    row.update({name: [getattr(defaults, name)] for name in ("prior_num_inference_steps", "prior_guidance_scale")})
    row.update(height=[pixels], width=[1], mode=[DEFAULT_MODE])
    return estimate(unit_totals(pa.table(row)), profile)
