"""GPU-seconds estimates for ``--dry-run``: stored per-accelerator calibrations, and fitting one from a run.

A profile holds three numbers, each the busy seconds of one GPU (one actor) per image:

- ``prior_step_seconds``: one prior denoising step, classifier-free guidance on (half when off);
- ``decoder_step_seconds``: one decoder UNet step of a 512x512 image, guidance on (half when off),
  proportional to the pixel count;
- ``decoder_image_seconds``: per 512x512 image, the rest of the decoder call (MoVQ decode), proportional
  to the pixel count (PNG encoding and upload run on the writers' CPUs, not on a GPU);
- ``score_image_seconds`` (optional, 0 when absent): the scoring stage (``--score clip``) per image: the
  CLIP image and text encoders at their fixed 224-pixel input, whatever the output size.

Guidance doubles the batch the model sees, hence the halving when it is off (``guidance_scale <= 1``);
img2img-family modes run ``int(num_inference_steps * strength)`` decoder steps.
"""

from __future__ import annotations

import argparse
import os
import sys
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


def _numbers(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy().astype(float)


def work_units(table: pa.Table) -> dict[str, np.ndarray]:
    """Per row of a work or results table: prior steps, decoder step-megapixels and megapixels (guidance applied)."""
    scale = _numbers(table, "height") * _numbers(table, "width") / REFERENCE_PIXELS
    steps = _numbers(table, "num_inference_steps")
    # Partial-schedule (img2img-family) pipelines skip the first (1 - strength): int(steps * strength) run.
    partial = pc.is_in(table.column("mode"), value_set=pa.array([m for m in MODES if MODES[m].partial_schedule]))
    partial = partial.to_numpy(zero_copy_only=False).astype(bool)
    steps = np.where(partial, np.floor(steps * _numbers(table, "strength")), steps)
    return {
        "scored_images": np.ones(table.num_rows),
        "prior_steps": _numbers(table, "prior_num_inference_steps")
        * _guidance_factor(_numbers(table, "prior_guidance_scale")),
        "decoder_steps": steps * _guidance_factor(_numbers(table, "guidance_scale")) * scale,
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


def fit_profile(results: pa.Table, *, name: str, source: str) -> Profile:
    """Least-squares profile from the ``prior_seconds`` / ``decoder_seconds`` of ``ok`` results rows.

    The decoder's step and per-image terms separate only when the rows vary in steps; otherwise
    all decoder time is put on the steps. Raises ValueError when no row has timings.
    """
    ok = results.filter(pc.equal(results.column("status"), "ok"))
    ok = ok.filter(pc.and_(ok.column("prior_seconds").is_valid(), ok.column("decoder_seconds").is_valid()))
    if ok.num_rows == 0:
        raise ValueError("no ok results rows with prior_seconds and decoder_seconds to fit a calibration from")
    units = work_units(ok)
    prior_seconds = _numbers(ok, "prior_seconds")
    decoder_seconds = _numbers(ok, "decoder_seconds")
    prior_step = float(prior_seconds @ units["prior_steps"] / (units["prior_steps"] @ units["prior_steps"]))
    steps = units["decoder_steps"]
    step, image = float(decoder_seconds @ steps / (steps @ steps)), 0.0
    design = np.stack([steps, units["decoder_images"]], axis=1)
    if np.linalg.matrix_rank(design) == 2:
        (fitted_step, fitted_image), *_ = np.linalg.lstsq(design, decoder_seconds, rcond=None)
        if fitted_step > 0 and fitted_image >= 0:  # noise can make the split unphysical: keep the one-term fit
            step, image = float(fitted_step), float(fitted_image)
    scored = (
        ok.column("score_seconds").drop_null() if "score_seconds" in ok.column_names else pa.array([], pa.float64())
    )
    score = float(pc.mean(scored).as_py()) if len(scored) else 0.0
    return Profile(
        name=name,
        prior_step_seconds=prior_step,
        decoder_step_seconds=float(step),
        decoder_image_seconds=float(image),
        score_image_seconds=score,
        measured=True,
        source=source,
    )


def profile_yaml(profile: Profile) -> str:
    """``profile`` as the YAML block to paste under ``profiles:`` in a calibration file."""
    block = {
        profile.name: {
            "measured": profile.measured,
            "source": profile.source,
            "prior_step_seconds": float(f"{profile.prior_step_seconds:.4g}"),
            "decoder_step_seconds": float(f"{profile.decoder_step_seconds:.4g}"),
            "decoder_image_seconds": float(f"{profile.decoder_image_seconds:.4g}"),
            "score_image_seconds": float(f"{profile.score_image_seconds:.4g}"),
        }
    }
    return yaml.safe_dump(block, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """``kandinsky-render calibrate OUTPUT --name NAME``: print a profile fitted from a finished run's results."""
    parser = argparse.ArgumentParser(
        prog="kandinsky-render calibrate",
        description="Fit a --dry-run calibration profile from the results of a finished run and print it as YAML.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("output", help="output prefix of a finished run (fsspec URI)")
    parser.add_argument("--name", required=True, help="profile name, e.g. the accelerator type (H100, A100, L4)")
    parser.add_argument("--source", default="", help="free text recorded with the profile (cluster, date, batch size)")
    args = parser.parse_args(argv)
    from actors.storage import Storage
    from jobs.options.storage import resolve
    from jobs.output.results import read_results

    storage = Storage(args.output, storage_options=resolve(environ=os.environ))
    try:
        profile = fit_profile(read_results(storage), name=args.name, source=args.source or f"fitted from {args.output}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(profile_yaml(profile), end="")
    return 0
