"""``kandinsky-render calibrate OUTPUT --name NAME``: fit a ``--dry-run`` calibration profile from a finished run.

The profile (`jobs.planning.calibration.Profile`) is fitted by least squares from the per-image busy
seconds (``prior_seconds``, ``decoder_seconds``, ``score_seconds``) of the run's ok results rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from jobs.options.flags import DefaultsHelpFormatter
from jobs.planning.calibration import Profile, numbers, work_units
from schemas.keys import STATS_FILE


def fit_profile(results: pa.Table, *, name: str, source: str, batch_size: int | None = None) -> Profile:
    """Least-squares profile from the ``prior_seconds`` / ``decoder_seconds`` of ``ok`` results rows.

    The decoder's step and per-image terms separate only when the rows vary in steps; otherwise
    all decoder time is put on the steps. With the run's ``batch_size`` and rows that vary in size as well
    as steps, the floors (per step and per call, whatever the size) are fitted too: each row's share of
    them, times the batch it shared them with; otherwise they stay estimated. Raises ValueError when no
    row has timings.
    """
    ok = results.filter(pc.equal(results.column("status"), "ok"))
    ok = ok.filter(pc.and_(ok.column("prior_seconds").is_valid(), ok.column("decoder_seconds").is_valid()))
    if ok.num_rows == 0:
        raise ValueError("no ok results rows with prior_seconds and decoder_seconds to fit a calibration from")
    units = work_units(ok)
    prior_seconds = numbers(ok, "prior_seconds")
    decoder_seconds = numbers(ok, "decoder_seconds")
    prior_step = float(prior_seconds @ units["prior_steps"] / (units["prior_steps"] @ units["prior_steps"]))
    steps = units["decoder_steps"]
    step, image = float(decoder_seconds @ steps / (steps @ steps)), 0.0
    design = np.stack([steps, units["decoder_images"]], axis=1)
    if np.linalg.matrix_rank(design) == 2:
        (fitted_step, fitted_image), *_ = np.linalg.lstsq(design, decoder_seconds, rcond=None)
        if fitted_step > 0 and fitted_image >= 0:  # noise can make the split unphysical: keep the one-term fit
            step, image = float(fitted_step), float(fitted_image)
    floors: dict[str, float] = {}
    design = np.stack([steps, units["decoder_images"], units["decoder_step_count"], units["images"]], axis=1)
    if batch_size and np.linalg.matrix_rank(design) == 4:
        (fitted_step, fitted_image, fixed_step, fixed_call), *_ = np.linalg.lstsq(design, decoder_seconds, rcond=None)
        if min(fitted_step, fitted_image, fixed_step, fixed_call) >= 0 and fitted_step > 0:
            step, image = float(fitted_step), float(fitted_image)
            floors = {
                "decoder_fixed_step_seconds": float(fixed_step) * batch_size,
                "decoder_call_seconds": float(fixed_call) * batch_size,
            }
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
        **floors,
        floors_measured=bool(floors),
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
            **(
                {
                    "decoder_fixed_step_seconds": float(f"{profile.decoder_fixed_step_seconds:.4g}"),
                    "decoder_call_seconds": float(f"{profile.decoder_call_seconds:.4g}"),
                }
                if profile.floors_measured
                else {}
            ),
        }
    }
    return yaml.safe_dump(block, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """``kandinsky-render calibrate OUTPUT --name NAME``: print a profile fitted from a finished run's results."""
    parser = argparse.ArgumentParser(
        prog="kandinsky-render calibrate",
        description="Fit a --dry-run calibration profile from the results of a finished run and print it as YAML.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("output", help="output prefix of a finished run (fsspec URI)")
    parser.add_argument("--name", required=True, help="profile name, e.g. the accelerator type (H100, A100, L4)")
    parser.add_argument(
        "--source",
        default="",
        help="free text recorded with the profile (cluster, date, batch size; default: the output)",
    )
    args = parser.parse_args(argv)
    from actors.storage import Storage
    from jobs.options.storage import resolve
    from jobs.reporting.results import read_results

    storage = Storage(args.output, storage_options=resolve(environ=os.environ))
    try:
        stats = json.loads(storage.read_bytes(STATS_FILE, max_bytes=64 << 20))
        batch_size = (stats.get("config") or {}).get("batch_size")
    except (FileNotFoundError, ValueError):
        batch_size = None  # no stats.json: the floors stay estimated
    try:
        profile = fit_profile(
            read_results(storage),
            name=args.name,
            source=args.source or f"fitted from {args.output}",
            batch_size=batch_size if isinstance(batch_size, int) else None,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(profile_yaml(profile), end="")
    return 0
