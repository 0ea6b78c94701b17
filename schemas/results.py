"""Results contract: one row per (id, image_index), status ``ok`` or ``error``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.recorded import (
    caption,
    describe_input,
    interpolate_items,
    model_columns,
    recorded_parameters,
)
from schemas.text import one_line

STATUS_OK = "ok"
STATUS_ERROR = "error"

# error_kind values (stats.json counts errors by kind).
ERROR_INVALID_ROW = "invalid_row"  # a value outside the manifest contract, found before model work
ERROR_INPUT = "input_error"  # an input image missing, unreadable, not an image, too large or of the wrong size
ERROR_UNSUPPORTED_SIZE = "unsupported_size"  # a size the decoder would silently change
ERROR_NON_FINITE = "non_finite_output"
ERROR_RENDER = "render_failed"  # the pipeline raised for this image
ERROR_WRITE = "write_failed"
# The scoring stage (--score) raised for an image: recorded in ``score_error`` (the image is kept), not a status.
ERROR_SCORE = "score_failed"
# Errors decided at planning from the row and the settings: a retry with the same settings gets them again.
REFUSAL_KINDS = (ERROR_INVALID_ROW, ERROR_UNSUPPORTED_SIZE)


# The gallery's stable sample: this many images, up to a quarter of them errors; previews this wide.
SAMPLE_SIZE = 48
SAMPLE_ERRORS = SAMPLE_SIZE // 4
THUMBNAIL_SIDE = 160
# CLIP scores (`--score clip`): histogram bins of 5 points over [0, 100], and the extremes the gallery shows.
SCORE_BIN_WIDTH = 5
SCORE_BINS = 100 // SCORE_BIN_WIDTH
SCORE_EXTREMES = 8


INTERPOLATE_ITEM = pa.struct([("prompt", pa.string()), ("image", pa.string()), ("weight", pa.float64())])
# Previews of a row's inputs (the gallery's cards): manifest column, a label (URI, or weight and prompt), a PNG.
INPUT_THUMBNAIL = pa.struct([("name", pa.string()), ("label", pa.string()), ("png", pa.binary())])

# What every written image carries with it in every format (webdataset ``<key>.json``, the parquet format's
# columns, the files format's ``metadata.parquet``) and in its results row: what its row asked for and what
# came out. Parameters its mode or prior input does not use are null (`recorded_parameters`).
SAMPLE_FIELDS = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("image_index", pa.int32(), nullable=False),
    pa.field("caption", pa.string()),  # the prompt; for interpolate rows its items with their weights
    pa.field("seed", pa.int64()),
    pa.field("mode", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("prior_image", pa.string()),
    pa.field("prior_strength", pa.float64()),
    pa.field("interpolate", pa.list_(INTERPOLATE_ITEM)),
    pa.field("image", pa.string()),
    pa.field("mask", pa.string()),
    pa.field("hint", pa.string()),
    pa.field("width", pa.int32()),  # the size the row asks for (the written image's)
    pa.field("height", pa.int32()),
    pa.field("num_inference_steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("prior_num_inference_steps", pa.int32()),
    pa.field("prior_guidance_scale", pa.float64()),
    pa.field("strength", pa.float64()),
    pa.field("prior_model", pa.string()),  # the checkpoints that made the image: name@content id
    pa.field("decoder_model", pa.string()),
    pa.field("depth_model", pa.string()),  # the depth estimator, for a ControlNet hint it estimated
    pa.field("dtype", pa.string()),  # the model stages' dtype
    pa.field("manifest_file", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("clip_score", pa.float64()),
    pa.field("filtered", pa.bool_()),
)
SAMPLE_META = tuple(f.name for f in SAMPLE_FIELDS)
# The per-image metadata of the sharded formats: the sample key, then `SAMPLE_FIELDS`.
SAMPLE_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), *SAMPLE_FIELDS])
# The webdataset format's ``<key>.json``: the sample's metadata with one JSON type per field and no null. JSON has
# no typed null and `datasets` types a tar's members from its first five samples, so a null there (a text2img row's
# ``strength``, any row's ``interpolate``) made every later sample that has the value fail to load. A value the row
# does not have is "" for text and inputs, -1 for numbers (every real one is >= 0) and false for ``filtered``;
# ``interpolate`` is its items as JSON text; ``has_negative_prompt`` tells a given "" (a real negative prompt) from
# none.
WEBDATASET_JSON_SCHEMA = pa.schema(
    [pa.field(f.name, pa.string()) if f.name == "interpolate" else f for f in SAMPLE_SCHEMA]
    + [pa.field("has_negative_prompt", pa.bool_(), nullable=False)]
)


def webdataset_json(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A sample's metadata (`SAMPLE_SCHEMA`) as its ``<key>.json`` holds it (`WEBDATASET_JSON_SCHEMA`)."""
    encoded: dict[str, Any] = {}
    for field in SAMPLE_SCHEMA:
        value, kind = meta.get(field.name), field.type
        if field.name == "interpolate":
            encoded[field.name] = "" if value is None else json.dumps(value, sort_keys=True)
        elif pa.types.is_floating(kind):
            encoded[field.name] = -1.0 if value is None else float(value)  # a float stays a float: "4.0", not "4"
        elif pa.types.is_integer(kind):
            encoded[field.name] = -1 if value is None else int(value)
        elif pa.types.is_boolean(kind):
            encoded[field.name] = bool(value)
        else:
            encoded[field.name] = "" if value is None else value
    encoded["has_negative_prompt"] = meta.get("negative_prompt") is not None
    return encoded


# Manifest image columns recorded as strings (see `HINT_ESTIMATED`).
RECORDED_IMAGES = ("prior_image", "image", "mask", "hint")


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """One outcome of one output image. ``uri`` (and ``member``) are set iff ``status == "ok"``.

    Where the image is, relative to the output (``OUTPUT/<uri>`` is its absolute form): ``files``
    format: ``uri`` is the PNG (``images/<part>/<key>.png``); ``webdataset``: ``uri`` is the part's
    tar and ``member`` the PNG member (``<key>.png``); ``parquet``: ``uri`` is the part's data file
    and ``member`` its ``key`` value. ``attempt`` numbers the shard's parts (0: its first rendering,
    n: its n-th ``--retry-errors`` part): an image's final row is its row of the highest attempt.
    ``thumbnail`` / ``input_thumbnails`` are small PNG previews of the image and of its inputs, kept
    only for the images the gallery may show (else null).
    """

    id: str
    image_index: int
    status: str
    error: str | None
    error_kind: str | None
    uri: str | None
    member: str | None
    shard: str | None
    attempt: int
    caption: str | None
    seed: int | None
    mode: str | None
    prompt: str | None
    negative_prompt: str | None
    prior_image: str | None
    prior_strength: float | None
    interpolate: list[dict[str, Any]] | None
    image: str | None
    mask: str | None
    hint: str | None
    width: int | None
    height: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    prior_num_inference_steps: int | None
    prior_guidance_scale: float | None
    strength: float | None
    prior_model: str | None  # "prior@<content id>" (`jobs.planning.identity`); null when the prior did not run
    decoder_model: str | None  # the mode's decoder checkpoint, "decoder@<content id>"
    depth_model: str | None  # the depth estimator when it estimated the row's hint
    dtype: str | None  # the model stages' dtype (float16, bfloat16, float32)
    manifest_file: str | None
    run_id: str
    clip_score: float | None  # --score clip: 100 x cos(image, prompt) of CLIP, clamped at 0
    filtered: bool | None  # --min-clip-score: the image scored below it (kept, flagged)
    prior_worker: str | None
    decoder_worker: str | None
    prior_seconds: float | None  # this image's share of its prior call's wall time
    decoder_seconds: float | None  # this image's share of its decoder call's wall time
    score_seconds: float | None  # this image's share of its scoring call's wall time (--score)
    finished_at: dt.datetime
    thumbnail: bytes | None
    input_thumbnails: list[dict[str, Any]] | None
    score_error: str | None  # why an ok image has no score

    def sample_meta(self, key: str) -> dict[str, Any]:
        """The metadata this image carries in its sample (`SAMPLE_SCHEMA`)."""
        return {"key": key} | {name: getattr(self, name) for name in SAMPLE_META}


def with_pandas_metadata(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``pandas`` metadata that makes pandas read its nullable integer and boolean
    columns as ``Int32`` / ``Int64`` / ``boolean`` (not float64 / object when a value is null)."""
    nullable = {pa.int32(): "Int32", pa.int64(): "Int64", pa.bool_(): "boolean"}
    columns = [
        {
            "name": f.name,
            "field_name": f.name,
            "pandas_type": "bool" if f.type == pa.bool_() else str(f.type),
            "numpy_type": nullable[f.type],
            "metadata": None,
        }
        for f in schema
        if f.type in nullable
    ]
    others = [
        {"name": f.name, "field_name": f.name, "pandas_type": "object", "numpy_type": "object", "metadata": None}
        for f in schema
        if f.type not in nullable
    ]
    order = {name: i for i, name in enumerate(schema.names)}
    metadata = {
        "index_columns": [],
        "column_indexes": [],
        "columns": sorted(columns + others, key=lambda c: order[c["name"]]),
        "creator": {"library": "kandinsky-render"},
        "pandas_version": "2.2.3",
    }
    # pandas reads only the columns it finds here with an extension type name; the others convert as usual.
    return schema.with_metadata({**(schema.metadata or {}), b"pandas": json.dumps(metadata).encode()})


_SAMPLE = {f.name: f for f in SAMPLE_FIELDS}
RESULTS_SCHEMA = pa.schema(
    [
        _SAMPLE["id"],
        _SAMPLE["image_index"],
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("member", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("attempt", pa.int32(), nullable=False),
        *(f for f in SAMPLE_FIELDS if f.name not in ("id", "image_index")),
        pa.field("prior_worker", pa.string()),
        pa.field("decoder_worker", pa.string()),
        pa.field("prior_seconds", pa.float64()),
        pa.field("decoder_seconds", pa.float64()),
        pa.field("score_seconds", pa.float64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("thumbnail", pa.binary()),
        pa.field("input_thumbnails", pa.list_(INPUT_THUMBNAIL)),
        pa.field("score_error", pa.string()),
    ]
)
RESULTS_SCHEMA = with_pandas_metadata(RESULTS_SCHEMA)

RESULT_FIELDS = tuple(field.name for field in dataclasses.fields(ResultRow))


def result_from_work(
    row: dict,
    *,
    run_id: str,
    model_ids: Mapping[str, str] | None = None,
    dtype: str | None = None,
    attempt: int = 0,
    error: str | None = None,
    error_kind: str | None = None,
    uri: str | None = None,
    member: str | None = None,
    shard: str | None = None,
    thumbnail: bytes | None = None,
    filtered: bool | None = None,
    width: int | None = None,
    height: int | None = None,
    decoder_worker: str | None = None,
    decoder_seconds: float | None = None,
) -> ResultRow:
    """The final result of one work row (a `schemas.work` row as a dict); ``error`` set means failed.

    The error is kept on one line, without memory addresses, at most `schemas.text.MAX_ERROR_CHARS` long.
    ``width`` / ``height``: the written image's (default: the size the row asks for, also on error rows).
    ``model_ids`` / ``dtype``: what made the image (`model_columns`; null on error rows).
    The row's input images, when it still has them (``image``, ``mask``, ``hint``, ``prior_image``,
    ``interpolate``), are recorded as `describe_input` strings.
    """
    items = interpolate_items(row.get("interpolate"))
    inputs = {
        name: describe_input(row.get(name), estimated=name == "hint" and bool(row.get("hint_estimated")))
        for name in RECORDED_IMAGES
    }
    return ResultRow(
        id=row["id"],
        image_index=row["image_index"],
        status=STATUS_ERROR if error else STATUS_OK,
        error=one_line(error) if error else error,
        error_kind=error_kind if error else None,
        uri=None if error else uri,
        member=None if error else member,
        shard=shard,
        attempt=attempt,
        caption=caption(row.get("prompt"), items),
        seed=row["seed"],
        mode=row["mode"],
        prompt=row.get("prompt"),
        negative_prompt=row.get("negative_prompt"),
        interpolate=items,
        **inputs,
        width=width if width is not None else row.get("width"),
        height=height if height is not None else row.get("height"),
        num_inference_steps=row.get("num_inference_steps"),
        guidance_scale=row.get("guidance_scale"),
        **recorded_parameters(row),
        manifest_file=row.get("manifest_file"),
        run_id=run_id,
        clip_score=None if error else row.get("clip_score"),
        filtered=None if error else filtered,
        **model_columns(row, {} if error else model_ids or {}),  # what made an image: none for an error
        dtype=None if error else dtype,
        prior_worker=row.get("prior_worker"),
        decoder_worker=decoder_worker if decoder_worker is not None else row.get("decoder_worker"),
        prior_seconds=row.get("prior_seconds"),
        decoder_seconds=decoder_seconds if decoder_seconds is not None else row.get("decoder_seconds"),
        score_seconds=row.get("score_seconds"),
        finished_at=dt.datetime.now(dt.timezone.utc),
        thumbnail=thumbnail,
        input_thumbnails=None,
        score_error=None if error else row.get("score_error"),
    )


def conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema``: its columns in that order and cast, a column it lacks (a part written before the
    column existed) all null."""
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_conformed(source: Any, schema: pa.Schema) -> pa.Table:
    """The Parquet file ``source`` (a path or file object) read as ``schema`` (`conformed`): only its columns that
    ``schema`` names are read."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source)
    present = [name for name in schema.names if name in parquet.schema_arrow.names]
    return conformed(parquet.read(columns=present), schema)


def results_table(rows: list[ResultRow]) -> pa.Table:
    """Build a `RESULTS_SCHEMA` table from result rows."""
    columns = {name: [getattr(row, name) for row in rows] for name in RESULT_FIELDS}
    return pa.table(columns, schema=RESULTS_SCHEMA)


def final_results(table: pa.Table) -> pa.Table:
    """One row per (id, image_index), sorted by it: its row of the highest ``attempt`` (the latest part
    that rendered it; an ``ok`` image is never rendered again), ties broken by ``finished_at``."""
    if table.num_rows == 0:
        return table
    rank = pc.if_else(pc.equal(table.column("status"), STATUS_OK), 1, 0)
    keys = [("id", "ascending"), ("image_index", "ascending"), ("_ok", "descending")]
    keys += [("attempt", "descending")] if "attempt" in table.column_names else []
    ranked = table.append_column("_ok", rank).sort_by([*keys, ("finished_at", "descending")])
    ids = ranked.column("id").to_numpy(zero_copy_only=False)
    index = ranked.column("image_index").to_numpy()
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (ids[1:] != ids[:-1]) | (index[1:] != index[:-1])
    return ranked.filter(pa.array(first)).drop_columns(["_ok"])
