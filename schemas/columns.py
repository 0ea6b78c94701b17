"""Manifest columns as people write them: integers stored as floats, and names that are not the contract's.

pandas writes an integer column with gaps (``None``/``NaN`` in some rows) as float64, so an integer
column may arrive as floats: each exact integer is taken as it is and NaN as null (the row takes the
default), while a fraction, an infinity or a value beyond 2**53 (where float64 skips integers, so the
value may be rounded already) refuses only its row. A column the contract does not know is ignored,
which hides a misspelling (``steps`` renders at the 100-step default): `unknown_columns` names each
with the column it most likely meant, for one warning per run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Every integer up to this size has an exact float64; above it a float column may hold a rounded value.
MAX_EXACT_FLOAT_INTEGER = 2**53

# Names from diffusers' pipeline arguments (and common habits) -> the manifest column that means the same.
ALIASES = {
    "steps": "num_inference_steps",
    "num_steps": "num_inference_steps",
    "prior_steps": "prior_num_inference_steps",
    "guidance": "guidance_scale",
    "cfg": "guidance_scale",
    "cfg_scale": "guidance_scale",
    "prior_guidance": "prior_guidance_scale",
    "num_images_per_prompt": "num_images",
    "n_images": "num_images",
    "negative": "negative_prompt",
    "text": "prompt",
    "caption": "prompt",
    "init_image": "image",
    "mask_image": "mask",
    "control_image": "hint",
    "depth": "hint",
    "generator": "seed",
    "images_and_prompts": "interpolate",
    "weights": "interpolate",
}
# Columns writers add on their own (pandas' index): never a user's misspelling, never warned about.
_TOOL_COLUMNS = ("__index_level_",)


def float_integers(array: pa.Array, *, name: str) -> tuple[pa.Array, list[str | None]]:
    """A float column of integers as int64, and per row why its value is not one (then null): NaN is null (the
    row takes the default); a fraction, an infinity or a value beyond 2**53 is refused with this reason."""
    floats = pc.fill_null(array.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        exact = np.isfinite(floats) & (np.floor(floats) == floats) & (np.abs(floats) <= MAX_EXACT_FLOAT_INTEGER)
    problems: list[str | None] = [None] * len(floats)
    advice = f'pandas writes an integer column with gaps as float64: df["{name}"].astype("Int64") keeps it integer'
    for i in np.flatnonzero(~exact & ~np.isnan(floats)):
        value = float(floats[i])
        whole = bool(np.isfinite(value)) and value == np.floor(value)
        why = "is beyond 2**53, where floats skip integers" if whole else "is not an integer"
        problems[i] = f"{name}={value!r} {why} (column {name!r} holds floats; {advice})"
    return pa.array(np.where(exact, floats, 0).astype(np.int64), pa.int64(), mask=~exact), problems


def as_int64(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An integer manifest column as stored (any integer or float type, or all nulls) as int64, a float that is no
    exact integer as null: for estimates from raw columns, before rows are validated (`float_integers`)."""
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    if pa.types.is_floating(array.type):
        return float_integers(array, name="")[0]
    return array.cast(pa.int64(), safe=False)


def unknown_columns(names: Iterable[str], known: Sequence[str]) -> dict[str, str | None]:
    """Each of ``names`` that is not in ``known`` -> the known column it most likely means (None: no guess).

    A guess is an alias (`ALIASES`, diffusers' argument names), else the closest name by spelling, else the
    one known column whose words hold all of the name's (``inference_steps`` -> ``num_inference_steps``).
    """
    found: dict[str, str | None] = {}
    for name in names:
        if name in known or name.startswith(_TOOL_COLUMNS) or name in found:
            continue
        folded = name.strip().lower().replace("-", "_").replace(" ", "_")
        guess = folded if folded in known else ALIASES.get(folded)
        if guess is None:
            close = difflib.get_close_matches(folded, known, n=1, cutoff=0.75)
            words = set(folded.split("_"))
            holding = [column for column in known if words <= set(column.split("_"))]
            guess = close[0] if close else (holding[0] if len(holding) == 1 else None)
        found[name] = guess
    return found


def describe_unknown(unknown: dict[str, str | None]) -> str:
    """``'steps' (did you mean 'num_inference_steps'?), 'notes'``: the unknown columns for a warning."""
    return ", ".join(f"{name!r}" + (f" (did you mean {guess!r}?)" if guess else "") for name, guess in unknown.items())
