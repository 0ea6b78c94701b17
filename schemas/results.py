"""Results contract: one row per (id, image_index), status ``ok`` or ``error``."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


# The gallery's stable sample: this many images, up to a quarter of them errors; previews this wide.
SAMPLE_SIZE = 48
SAMPLE_ERRORS = SAMPLE_SIZE // 4
THUMBNAIL_SIDE = 160
# CLIP scores (`--score clip`): histogram bins of 5 points over [0, 100], and the extremes the gallery shows.
SCORE_BIN_WIDTH = 5
SCORE_BINS = 100 // SCORE_BIN_WIDTH
SCORE_EXTREMES = 8


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """One outcome of one output image. ``uri`` (and ``member``) are set iff ``status == "ok"``.

    Where the image is: ``files`` format: ``uri`` is the PNG; ``webdataset``: ``uri`` is the shard's
    tar and ``member`` the PNG member (``<key>.png``); ``parquet``: ``uri`` is the shard's data file
    and ``member`` its ``key`` value. ``thumbnail`` is a small PNG preview, kept only for the images
    the gallery may show (else null).
    """

    id: str
    image_index: int
    status: str
    error: str | None
    error_kind: str | None
    uri: str | None
    member: str | None
    shard: str | None
    seed: int | None
    width: int | None
    height: int | None
    mode: str | None
    prompt: str | None
    negative_prompt: str | None
    num_inference_steps: int | None
    guidance_scale: float | None
    prior_num_inference_steps: int | None
    prior_guidance_scale: float | None
    strength: float | None
    manifest_file: str | None
    run_id: str
    prior_worker: str | None
    decoder_worker: str | None
    prior_seconds: float | None  # this image's share of its prior call's wall time
    decoder_seconds: float | None  # this image's share of its decoder call's wall time
    score_seconds: float | None  # this image's share of its scoring call's wall time (--score)
    finished_at: dt.datetime
    thumbnail: bytes | None
    clip_score: float | None  # --score clip: 100 x cos(image, prompt) of CLIP, clamped at 0
    filtered: bool | None  # --min-clip-score: the image scored below it (kept, flagged)
    score_error: str | None  # why an ok image has no score


RESULTS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("member", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mode", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("num_inference_steps", pa.int32()),
        pa.field("guidance_scale", pa.float64()),
        pa.field("prior_num_inference_steps", pa.int32()),
        pa.field("prior_guidance_scale", pa.float64()),
        pa.field("strength", pa.float64()),
        pa.field("manifest_file", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("prior_worker", pa.string()),
        pa.field("decoder_worker", pa.string()),
        pa.field("prior_seconds", pa.float64()),
        pa.field("decoder_seconds", pa.float64()),
        pa.field("score_seconds", pa.float64()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("thumbnail", pa.binary()),
        pa.field("clip_score", pa.float64()),
        pa.field("filtered", pa.bool_()),
        pa.field("score_error", pa.string()),
    ]
)

RESULT_FIELDS = tuple(field.name for field in dataclasses.fields(ResultRow))


def result_from_work(
    row: dict,
    *,
    run_id: str,
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
    """
    return ResultRow(
        id=row["id"],
        image_index=row["image_index"],
        status=STATUS_ERROR if error else STATUS_OK,
        error=one_line(error) if error else error,
        error_kind=error_kind if error else None,
        uri=None if error else uri,
        member=None if error else member,
        shard=shard,
        seed=row["seed"],
        width=width,
        height=height,
        mode=row["mode"],
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        prior_num_inference_steps=row["prior_num_inference_steps"],
        prior_guidance_scale=row["prior_guidance_scale"],
        strength=row["strength"],
        manifest_file=row["manifest_file"],
        run_id=run_id,
        prior_worker=row.get("prior_worker"),
        decoder_worker=decoder_worker if decoder_worker is not None else row.get("decoder_worker"),
        prior_seconds=row.get("prior_seconds"),
        decoder_seconds=decoder_seconds if decoder_seconds is not None else row.get("decoder_seconds"),
        score_seconds=row.get("score_seconds"),
        finished_at=dt.datetime.now(dt.timezone.utc),
        thumbnail=thumbnail,
        clip_score=None if error else row.get("clip_score"),
        filtered=None if error else filtered,
        score_error=None if error else row.get("score_error"),
    )


def results_table(rows: list[ResultRow]) -> pa.Table:
    """Build a `RESULTS_SCHEMA` table from result rows."""
    columns = {name: [getattr(row, name) for row in rows] for name in RESULT_FIELDS}
    return pa.table(columns, schema=RESULTS_SCHEMA)


def final_results(table: pa.Table) -> pa.Table:
    """One row per (id, image_index): the ``ok`` row if any, else the latest error row."""
    if table.num_rows == 0:
        return table
    rank = pc.if_else(pc.equal(table.column("status"), STATUS_OK), 1, 0)
    ranked = table.append_column("_ok", rank).sort_by(
        [("id", "ascending"), ("image_index", "ascending"), ("_ok", "descending"), ("finished_at", "descending")]
    )
    ids = ranked.column("id").to_numpy(zero_copy_only=False)
    index = ranked.column("image_index").to_numpy()
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (ids[1:] != ids[:-1]) | (index[1:] != index[:-1])
    return ranked.filter(pa.array(first)).drop_columns(["_ok"])
