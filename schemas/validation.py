"""Row validation: per row of a defaults-filled manifest table, the first problem that makes it an error row.

A malformed manifest (schema, ids, modes) is refused whole by `schemas.manifest`; here a well-formed
row with a bad value (no prompt, a size over the limits, a missing input, a size its mode's decoder
would change) becomes an ``error`` result, and every other row still renders.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.keys import MAX_SEED
from schemas.manifest import (
    DECODER_IMAGE_COLUMNS,
    IMAGE_COLUMNS,
    LOCAL_PROTOCOLS,
    VALUE_PROBLEM,
    Limits,
    input_protocols,
    uri_protocol,
)
from schemas.modes import MODES, PRIOR_KINDS, uses_column
from schemas.text import public_uri, quoted


def size_problems(table: pa.Table, *, scales: Mapping[str, int]) -> list[str | None]:
    """Per row: why its mode's decoder cannot render exactly its size (`schemas.modes.Mode.size_problem`), or None.

    ``scales`` maps checkpoint name -> MoVQ scale factor; modes whose checkpoint is absent are not checked.
    """
    problems: list[str | None] = [None] * table.num_rows
    keys = table.select(["mode", "height", "width"])
    for key in keys.group_by(["mode", "height", "width"]).aggregate([]).to_pylist():
        mode = MODES.get(key["mode"])
        if mode is None or mode.checkpoint not in scales:
            continue
        problem = mode.size_problem(height=key["height"], width=key["width"], scale=scales[mode.checkpoint])
        if problem is None:
            continue
        match = pc.and_(
            pc.and_(pc.equal(keys.column("mode"), key["mode"]), pc.equal(keys.column("height"), key["height"])),
            pc.equal(keys.column("width"), key["width"]),
        )
        for i in np.flatnonzero(match.to_numpy(zero_copy_only=False)):
            problems[i] = problem
    return problems


def embedding_problems(table: pa.Table, *, dim: int) -> list[str | None]:
    """Per row: why its given embeddings cannot be rendered from (wrong length, missing or non-finite values)."""
    problems: list[str | None] = [None] * table.num_rows
    for name in ("image_embeds", "negative_image_embeds"):
        column = table.column(name)
        for i in np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False)):
            if problems[i] is not None:
                continue
            values = column[int(i)].values
            if len(values) != dim:
                problems[i] = f"{name} has {len(values)} values; the prior checkpoint's embeddings have {dim}"
            elif values.null_count:
                problems[i] = f"{name} has {values.null_count} missing value(s)"
            elif not np.isfinite(values.to_numpy(zero_copy_only=False)).all():
                problems[i] = f"{name} holds NaN or infinite values"
    return problems


# Edges of the pipelines' schedulers, found by trying them (tests/test_schedules.py tries each again): the prior's
# UnCLIPScheduler divides by steps - 1, and the decoders' DDPMScheduler (1000 training steps, steps_offset 1,
# "leading" spacing, as in the public checkpoints and the tiny ones) refuses more steps than it has training steps
# and indexes past its last timestep when a schedule of 1000 steps starts at its first.
PRIOR_MIN_STEPS = 2
DECODER_TRAIN_STEPS = 1000
DECODER_STEPS_OFFSET = 1


def first_decoder_timestep(steps: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """The timestep the decoders' DDPMScheduler starts at for ``steps`` steps when a partial schedule (img2img)
    skips the first ``skipped`` of them: ``steps_offset + (steps - 1 - skipped) * (1000 // steps)``."""
    steps = np.clip(np.asarray(steps, dtype=np.int64), 1, None)
    return DECODER_STEPS_OFFSET + (steps - 1 - np.asarray(skipped, dtype=np.int64)) * (DECODER_TRAIN_STEPS // steps)


def value_bounds(limits: Limits) -> dict[str, tuple[int | float, int | float]]:
    """Each numeric manifest column (and job default) -> its inclusive bounds: what a row may ask for."""
    return {
        "num_images": (1, limits.max_num_images),
        "height": (1, limits.max_side),
        "width": (1, limits.max_side),
        "num_inference_steps": (1, limits.max_num_inference_steps),
        "prior_num_inference_steps": (1, limits.max_num_inference_steps),
        "guidance_scale": (0.0, limits.max_guidance_scale),
        "prior_guidance_scale": (0.0, limits.max_guidance_scale),
        "strength": (0.0, 1.0),
        "prior_strength": (0.0, 1.0),
    }


def row_problems(table: pa.Table, *, limits: Limits, manifest: str) -> list[str | None]:
    """Per row of a defaults-filled table read from ``manifest``: None when renderable, else the first problem,
    worded for users. Input URIs are checked against `schemas.manifest.input_protocols` for ``manifest``.

    Vectorised per check; values are converted to Python only for the rows a check flags.
    """
    protocols = input_protocols(limits, manifest=manifest)
    n = table.num_rows
    problems: list[str | None] = [None] * n

    def flag(mask: object, message: str | None = None, *, column: str | None = None, fmt: str = "") -> None:
        rows = [int(i) for i in np.flatnonzero(np.asarray(mask, dtype=bool)) if problems[i] is None]
        if not rows:
            return
        values = table.column(column).take(pa.array(rows, pa.int64())).to_pylist() if column else None
        for k, i in enumerate(rows):
            problems[i] = message if values is None else fmt.format(column=column, value=values[k])

    def np_col(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)

    def is_set(name: str) -> np.ndarray:
        return np.asarray(table.column(name).is_valid().to_numpy(zero_copy_only=False), dtype=bool)

    if VALUE_PROBLEM in table.column_names:  # a value that could not take its column's type (`normalize`)
        for i, problem in enumerate(table.column(VALUE_PROBLEM).to_pylist()):
            problems[i] = problem
    modes = np.asarray(table.column("mode").to_numpy(zero_copy_only=False), dtype=object)
    prompt_len = pc.fill_null(pc.utf8_length(table.column("prompt")), 0).to_numpy(zero_copy_only=False)
    has_interpolate = is_set("interpolate")
    has_embeds = is_set("image_embeds")
    flag(
        (prompt_len == 0) & ~has_interpolate & ~has_embeds,
        "prompt is null or empty; every row needs a prompt (or 'interpolate', or 'image_embeds')",
    )
    flag(prompt_len > limits.max_prompt_chars, f"prompt is longer than {limits.max_prompt_chars} characters")
    neg_len = pc.fill_null(pc.utf8_length(table.column("negative_prompt")), 0).to_numpy(zero_copy_only=False)
    flag(neg_len > limits.max_prompt_chars, f"negative_prompt is longer than {limits.max_prompt_chars} characters")

    for name, (low, high) in value_bounds(limits).items():
        values = np_col(name).astype(np.float64)
        bad = ~np.isfinite(values) | (values < low) | (values > high)
        flag(bad, column=name, fmt=f"{{column}}={{value}} is outside [{low}, {high}]")

    seed_values = pc.fill_null(table.column("seed"), 0).to_numpy(zero_copy_only=False)
    num_images = np_col("num_images")
    flag(  # image i uses seed + i: the last one, seed + num_images - 1, must stay <= MAX_SEED (2**62 - 1)
        (seed_values < 0) | (seed_values > MAX_SEED + 1 - np.clip(num_images, 1, None)),
        column="seed",
        fmt="{column}={value} is outside [0, 2**62 - num_images]",
    )

    for name in DECODER_IMAGE_COLUMNS:
        not_used = np.isin(modes, [m.name for m in MODES.values() if name not in m.reads])
        flag(
            is_set(name) & not_used,
            column="mode",
            fmt=f"column {name!r} is set but mode {{value}} does not use it "
            f"(it is read by: {', '.join(uses_column(name))})",
        )
    for mode in MODES.values():
        of_mode = modes == mode.name
        for name in sorted(mode.required):
            flag(of_mode & ~is_set(name), mode.needs_message(name))
        if mode.hint_estimated and "image" not in mode.required:
            flag(
                of_mode & ~is_set("hint") & ~is_set("image"),
                f"{mode.needs_message('hint')} or an 'image' to estimate one from",
            )
    # Partial-schedule decoders and PriorEmb2Emb run int(steps * strength) steps and crash at 0.
    steps_run = np.floor(np_col("num_inference_steps") * np_col("strength").astype(np.float64) + 1e-9)
    partial = [m.name for m in MODES.values() if m.partial_schedule]
    flag(
        np.isin(modes, partial) & (steps_run < 1),
        "num_inference_steps * strength < 1: the img2img decoder would run no denoising step",
    )
    prior_steps_run = np.floor(np_col("prior_num_inference_steps") * np_col("prior_strength").astype(np.float64) + 1e-9)
    for kind in PRIOR_KINDS.values():
        if kind.partial_schedule:
            flag(
                is_set(kind.reads) & (prior_steps_run < 1),
                f"prior_num_inference_steps * prior_strength < 1: the {kind.description} would run no step",
            )
    prior_steps = np_col("prior_num_inference_steps")
    flag(
        ~has_embeds & (prior_steps < PRIOR_MIN_STEPS),
        column="prior_num_inference_steps",
        fmt=f"{{column}}={{value}}: the prior's UnCLIPScheduler needs at least {PRIOR_MIN_STEPS} steps "
        "(it divides by steps - 1: ZeroDivisionError)",
    )
    steps = np_col("num_inference_steps")
    skipped = np.where(np.isin(modes, partial), steps - np.minimum(steps_run, steps), 0)  # a partial schedule's
    flag(
        steps > DECODER_TRAIN_STEPS,
        column="num_inference_steps",
        fmt=f"{{column}}={{value}} is more than the {DECODER_TRAIN_STEPS} training steps of the decoder's "
        "DDPMScheduler (diffusers refuses it)",
    )
    flag(
        first_decoder_timestep(steps, skipped) >= DECODER_TRAIN_STEPS,
        column="num_inference_steps",
        fmt=f"{{column}}={{value}} makes the decoder's DDPMScheduler start at timestep {DECODER_TRAIN_STEPS}, past "
        f"its last ({DECODER_TRAIN_STEPS - 1}; diffusers fails with IndexError): ask for at most "
        f"{DECODER_TRAIN_STEPS - 1} steps (img2img modes: or a strength below 1)",
    )
    flag(is_set("prior_image") & has_interpolate, "set either 'prior_image' or 'interpolate', not both")
    flag(
        has_embeds & (is_set("prior_image") | has_interpolate),
        "'image_embeds' replaces the prior: set no 'prior_image' or 'interpolate' with it",
    )
    flag(
        has_embeds & is_set("negative_prompt"),
        "'negative_prompt' does not apply to given 'image_embeds' (give 'negative_image_embeds' instead)",
    )
    flag(is_set("negative_image_embeds") & ~has_embeds, "'negative_image_embeds' is set without 'image_embeds'")
    flag(
        has_interpolate & (prompt_len > 0),
        "set either 'prompt' or 'interpolate' (a weighted list of prompts and images replaces the prompt)",
    )
    for i in np.flatnonzero(has_interpolate):
        if problems[i] is None:
            problems[i] = _interpolate_problem(
                table.column("interpolate")[int(i)].as_py(), limits=limits, protocols=protocols
            )
    for name in IMAGE_COLUMNS:
        column = table.column(name)
        for i in np.flatnonzero(is_set(name)):
            if problems[i] is None:
                problems[i] = _ref_problem(column[int(i)].as_py(), column=name, limits=limits, protocols=protocols)
    return problems


def _interpolate_problem(items: list[dict], *, limits: Limits, protocols: tuple[str, ...]) -> str | None:
    if not items:
        return "interpolate is an empty list"
    if len(items) > limits.max_interpolate_items:
        return f"interpolate has {len(items)} items, more than {limits.max_interpolate_items}"
    for k, item in enumerate(items):
        has_prompt, has_image = bool(item["prompt"]), item["image"] is not None
        if has_prompt == has_image:
            return f"interpolate[{k}] must have exactly one of 'prompt' or 'image'"
        weight = item["weight"]
        if weight is None or not np.isfinite(weight):
            return f"interpolate[{k}].weight={weight} is not a finite number"
        if has_image:
            problem = _ref_problem(item["image"], column=f"interpolate[{k}].image", limits=limits, protocols=protocols)
            if problem:
                return problem
    return None


def _ref_problem(ref: dict, *, column: str, limits: Limits, protocols: tuple[str, ...]) -> str | None:
    if ref["data"] is not None:
        if len(ref["data"]) > limits.max_input_bytes:
            size = len(ref["data"])
            return f"{column} holds {size} bytes, above the limit of {limits.max_input_bytes} (--max-input-bytes)"
        return None if len(ref["data"]) else f"{column} holds empty bytes"
    uri = ref["uri"]
    if not uri or not uri.strip():
        return f"{column} is an empty URI"
    if any(ord(ch) < 32 for ch in uri):
        return f"{column} URI {quoted(public_uri(uri))} contains control characters"
    protocol = uri_protocol(uri)
    if protocol not in protocols:
        local = (
            " (worker-local files are read only when --allowed-protocols allows file; by default only for a local "
            "manifest)"
            if protocol in LOCAL_PROTOCOLS
            else ""
        )
        return (
            f"{column} URI {quoted(public_uri(uri))} uses protocol {quoted(protocol, 40)}, which is not allowed{local} "
            f"(allowed: {', '.join(protocols)}; see --allowed-protocols)"
        )
    return None
