"""GPU-seconds estimates for ``--dry-run``: per-accelerator calibration profiles and what work costs on one.

A profile holds three numbers, each the busy seconds of one GPU (one actor) per image:

- ``prior_step_seconds``: one prior denoising step, classifier-free guidance on (half when off);
- ``decoder_step_seconds``: one decoder UNet step of a 512x512 image, guidance on (half when off),
  proportional to the pixel count;
- ``decoder_image_seconds``: per 512x512 image, the rest of the decoder call (MoVQ decode), proportional
  to the pixel count (PNG encoding and upload run on the writers' CPUs, not on a GPU);
- ``score_image_seconds`` (optional, 0 when absent): the scoring stage (``--score clip``) per image: the
  CLIP image and text encoders at their fixed 224-pixel input, whatever the output size;
- the floors, what a call costs whatever its images' size (kernel launches, host work), shared by the
  images of the call: ``decoder_fixed_step_seconds`` per denoising step of a call, ``decoder_call_seconds``
  per call (MoVQ decode set-up, copies), ``prior_fixed_step_seconds`` and ``prior_call_seconds``. At
  768x768 they are under a tenth of a decoder call; at 64-256 px they are most of it (a step is
  launch-bound), so plans at small sizes stay physical. Estimated (`ESTIMATED_FLOORS`) until
  ``calibrate`` fits them from a run.

Guidance doubles the batch the model sees, hence the halving when it is off (``guidance_scale <= 1``);
img2img-family modes run ``int(num_inference_steps * strength)`` decoder steps. A profile is fitted
from a finished run's results by ``kandinsky-render calibrate`` (`jobs.reporting.calibrate`).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

import cluster
from cluster.accelerators import ACCELERATORS, accelerator_spec, canonical_accelerator
from cluster.layout import StageCosts
from schemas.manifest import RenderDefaults
from schemas.modes import DEFAULT_MODE, MODES

REFERENCE_PIXELS = 512 * 512
DEFAULT_CALIBRATION = os.path.join(os.path.dirname(os.path.abspath(cluster.__file__)), "calibration.yaml")
MAX_CALIBRATION_BYTES = 1 << 20  # a few profiles: a larger file is not a calibration file


# FLOPs per unit of work, counted with torch's FlopCounterMode on the real architectures built on the meta
# device (jobs/dev/real_size.py; tests/test_benchmark.py recounts the decoder's): one guided UNet step of a
# 512x512 image is 2 samples x 0.886 TFLOP (1.993 at 768x768), the MoVQ decode 2.18 TFLOP (4.9 at 768x768), a
# guided prior step 0.34 TFLOP (8.5 per 25-step image); CLIP ViT-bigG/14 image + text encoding ~1 TFLOP per
# scored image; DPT-large depth at 384x384 ~0.5 TFLOP per estimated hint.
DECODER_STEP_TFLOP = 1.772
DECODER_IMAGE_TFLOP = 2.18
PRIOR_STEP_TFLOP = 0.34
SCORE_IMAGE_TFLOP = 1.0
DEPTH_IMAGE_TFLOP = 0.5
# Share of the dense fp16 peak estimated profiles assume: diffusers' own A100 table for SD 1.5 at batch 16 is
# 25% eager and 39% compiled. A measured profile (`kandinsky-render calibrate`) replaces the estimate.
ESTIMATE_EFFICIENCY = 0.4
# Floors of estimated profiles, seconds (host-bound: the same on every GPU type): an eager UNet step launches
# ~1,500 kernels (~15 ms at 64x64 whatever the batch), a call's set-up and MoVQ decode launches ~20 ms more; the
# prior's transformer steps and encoders are smaller.
ESTIMATED_FLOORS = {
    "decoder_fixed_step_seconds": 0.015,
    "decoder_call_seconds": 0.02,
    "prior_fixed_step_seconds": 0.008,
    "prior_call_seconds": 0.01,
}
# The batch sizes the floors are shared over when a plan has not chosen them yet (the GPU defaults' largest).
NOMINAL_BATCH_SIZE = 16


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
    depth_image_seconds: float = 0.0
    decoder_fixed_step_seconds: float = ESTIMATED_FLOORS["decoder_fixed_step_seconds"]
    decoder_call_seconds: float = ESTIMATED_FLOORS["decoder_call_seconds"]
    prior_fixed_step_seconds: float = ESTIMATED_FLOORS["prior_fixed_step_seconds"]
    prior_call_seconds: float = ESTIMATED_FLOORS["prior_call_seconds"]
    floors_measured: bool = False


def estimated_profile(name: str) -> Profile | None:
    """A profile for accelerator type ``name`` from the FLOP counts at `ESTIMATE_EFFICIENCY` of its dense fp16
    peak (`cluster.defaults.ACCELERATORS`); None for a type that table does not know."""
    accelerator = accelerator_spec(name)
    if accelerator is None:
        return None
    name = canonical_accelerator(name)
    rate = accelerator.peak_tflops * ESTIMATE_EFFICIENCY
    return Profile(
        name=name,
        prior_step_seconds=PRIOR_STEP_TFLOP / rate,
        decoder_step_seconds=DECODER_STEP_TFLOP / rate,
        decoder_image_seconds=DECODER_IMAGE_TFLOP / rate,
        score_image_seconds=SCORE_IMAGE_TFLOP / rate,
        depth_image_seconds=DEPTH_IMAGE_TFLOP / rate,
        measured=False,
        source=f"estimate: FLOP counts at {ESTIMATE_EFFICIENCY:.0%} of the {name}'s {accelerator.peak_tflops:g} "
        "TFLOP/s dense fp16 peak, plus estimated per-call and per-step floors; replace with a profile measured by "
        "`kandinsky-render calibrate`",
    )


def profiles_with_estimates(profiles: list[Profile]) -> list[Profile]:
    """``profiles`` (a calibration file's), then an estimated profile of every known accelerator type they lack."""
    named = {profile.name for profile in profiles}
    named = {name.upper() for name in named}
    return [*profiles, *(p for name in ACCELERATORS if name.upper() not in named and (p := estimated_profile(name)))]


def profile_for(accelerator: str, *, path: str = DEFAULT_CALIBRATION) -> Profile | None:
    """The calibration file's profile for ``accelerator`` (measured or not), else its estimate; None if unknown."""
    found = {p.name.upper(): p for p in profiles_with_estimates(load_calibration(path))}
    return found.get(canonical_accelerator(accelerator).upper())


def load_calibration(path: str = DEFAULT_CALIBRATION) -> list[Profile]:
    """Profiles of a calibration YAML file (``profiles: {name: {...}}``); ValueError when malformed, or when it is
    not a regular file (a FIFO would block the read forever, a device stream forever) of `MAX_CALIBRATION_BYTES`."""
    from actors.storage_io import UnsafeObjectError, read_local
    from jobs.options.config_file import ConfigLoader

    try:
        raw = read_local(path, MAX_CALIBRATION_BYTES)  # opened without blocking: a FIFO or a device is refused
        if raw is None:
            raise FileNotFoundError(path)
        data = yaml.load(raw.decode("utf-8"), Loader=ConfigLoader) or {}  # noqa: S506 - a safe loader, bounded
    except FileNotFoundError:
        raise ValueError(f"calibration file {path}: no such file") from None
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration file {path}: not valid YAML ({type(exc).__name__})") from None
    except UnsafeObjectError as exc:
        raise ValueError(f"calibration file {exc}") from None
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
                    depth_image_seconds=float(values.get("depth_image_seconds", 0.0)),
                    measured=bool(values.get("measured", False)),
                    source=str(values.get("source", "")),
                    **{key: float(values[key]) for key in ESTIMATED_FLOORS if key in values},
                    floors_measured=all(key in values for key in ESTIMATED_FLOORS),
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
        # what the floors count: images, and steps whatever the size or guidance (shared by a call's images)
        "images": np.ones(table.num_rows),
        "decoder_step_count": steps,
        "prior_step_count": numbers(table, "prior_num_inference_steps"),
    }


def unit_totals(work: pa.Table) -> dict[str, float]:
    """`work_units` summed over planned ``work`` rows (add the totals of several shards to estimate them all)."""
    return {name: float(values.sum()) for name, values in work_units(work).items()}


def estimate(
    totals: dict[str, float],
    profile: Profile,
    *,
    batch_size: int = NOMINAL_BATCH_SIZE,
    prior_batch_size: int = NOMINAL_BATCH_SIZE,
) -> dict[str, float]:
    """Estimated busy GPU-seconds per stage, on ``profile``, for work of these `unit_totals`, in calls of
    ``batch_size`` images (decoder) and ``prior_batch_size`` (prior) that share the floors."""
    totals = collections.defaultdict(float, totals)  # nothing to render: no totals at all
    images = totals["images"]
    prior = totals["prior_steps"] * profile.prior_step_seconds
    prior += (
        totals["prior_step_count"] * profile.prior_fixed_step_seconds + images * profile.prior_call_seconds
    ) / max(prior_batch_size, 1)
    decoder = totals["decoder_steps"] * profile.decoder_step_seconds
    decoder += totals["decoder_images"] * profile.decoder_image_seconds
    decoder += (
        totals["decoder_step_count"] * profile.decoder_fixed_step_seconds + images * profile.decoder_call_seconds
    ) / max(batch_size, 1)
    score = totals["scored_images"] * profile.score_image_seconds
    return {"prior": prior, "decoder": decoder, "score": score, "total": prior + decoder + score}


def image_seconds(profile: Profile, *, defaults: RenderDefaults, pixels: int) -> dict[str, float]:
    """`estimate` of one text2img image of ``pixels`` pixels whose parameters are ``defaults``."""
    row = {name: [getattr(defaults, name)] for name in ("num_inference_steps", "guidance_scale", "strength")}
    row.update({name: [getattr(defaults, name)] for name in ("prior_num_inference_steps", "prior_guidance_scale")})
    row.update(height=[pixels], width=[1], mode=[DEFAULT_MODE])
    return estimate(unit_totals(pa.table(row)), profile)


def stage_costs(
    profile: Profile,
    totals: dict[str, float],
    *,
    num_images: int,
    score: bool,
    depth_images: int = 0,
    batch_size: int | None = None,
    prior_batch_size: int | None = None,
) -> StageCosts:
    """Per-image stage costs (the layout planner's input) of work with these `unit_totals` on ``profile``, in calls
    of ``batch_size`` / ``prior_batch_size`` images (`NOMINAL_BATCH_SIZE` when not chosen yet)."""
    seconds = estimate(
        totals,
        profile,
        batch_size=batch_size or NOMINAL_BATCH_SIZE,
        prior_batch_size=prior_batch_size or batch_size or NOMINAL_BATCH_SIZE,
    )
    per = max(num_images, 1)
    kind = "measured" if profile.measured else "estimated"
    return StageCosts(
        prior=seconds["prior"] / per,
        decoder=max(seconds["decoder"] / per, 1e-12),
        score=seconds["score"] / per if score else 0.0,
        depth=depth_images * profile.depth_image_seconds / per,
        source=f"{profile.name} profile, {kind}",
    )
