"""Work items: one row per output image, as it travels driver -> prior -> decoder -> results.

A planned batch is an Arrow table of `WORK_SCHEMA` rows that one pipeline call can serve; it
crosses actor boundaries as Arrow IPC bytes (`to_ipc` / `from_ipc`), so only bytes travel.
The prior adds the `embed_fields` (embeddings as fixed-size float32 lists, never per-float Python
objects); a row whose ``error`` is set is passed through untouched.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.manifest import EMBEDDING_TYPE, IMAGE_REF, INTERPOLATE_TYPE

# Parameters that must be equal for every row of one prior call (the prior stage's call key).
PRIOR_CALL_KEY = (
    "prior_kind",
    "prior_num_inference_steps",
    "prior_guidance_scale",
    "prior_strength",
    "has_negative_prompt",
)
# Parameters that must be equal for every row of one decoder call (the decoder stage's call key, and
# the planner's batch key: a planned batch is one decoder call). Prior-only settings are not among them:
# rows that differ only in those share a decoder call, and the prior stage splits its own calls by
# `PRIOR_CALL_KEY` (rows are sorted by it within a batch, so each kind stays together).
CALL_KEY = (
    "mode",
    "inputs_key",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "strength",
)

WORK_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64()),  # null only on rows refused for a bad seed
        pa.field("mode", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("negative_prompt", pa.string()),
        pa.field("has_negative_prompt", pa.bool_(), nullable=False),
        pa.field("height", pa.int64(), nullable=False),
        pa.field("width", pa.int64(), nullable=False),
        pa.field("num_inference_steps", pa.int64(), nullable=False),
        pa.field("guidance_scale", pa.float64(), nullable=False),
        pa.field("prior_num_inference_steps", pa.int64(), nullable=False),
        pa.field("prior_guidance_scale", pa.float64(), nullable=False),
        pa.field("strength", pa.float64(), nullable=False),
        pa.field("prior_strength", pa.float64(), nullable=False),
        pa.field("prior_kind", pa.string(), nullable=False),  # text | image | interpolate
        # A digest of the image columns in the mode's `batch_inputs` ("" for modes without): rows with
        # different inputs there never share a call (schemas.modes, inpaint).
        pa.field("inputs_key", pa.string(), nullable=False),
        pa.field("image", IMAGE_REF),
        pa.field("mask", IMAGE_REF),
        pa.field("hint", IMAGE_REF),  # given, or a depth map (PNG bytes) added by the depth stage
        pa.field("hint_estimated", pa.bool_(), nullable=False),  # the depth stage makes (made) this row's hint
        pa.field("prior_image", IMAGE_REF),
        pa.field("interpolate", INTERPOLATE_TYPE),
        # Embeddings the manifest gives (prior_kind "embeds"); the prior passes them on as its output.
        pa.field("image_embeds_given", EMBEDDING_TYPE),
        pa.field("negative_image_embeds_given", EMBEDDING_TYPE),
        pa.field("manifest_file", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
    ]
)


def embed_fields(dim: int) -> tuple[pa.Field, ...]:
    """The columns the prior adds to work rows; ``dim`` is the embedding size (1280 real, 32 tiny)."""
    return (
        pa.field("image_embeds", pa.list_(pa.float32(), dim)),
        pa.field("negative_image_embeds", pa.list_(pa.float32(), dim)),
        pa.field("generator_state", pa.binary()),  # torch CPU generator state after the prior
        pa.field("prior_worker", pa.string()),
        pa.field("prior_seconds", pa.float64()),  # this image's share of its prior call's wall time
    )


def embed_schema(dim: int) -> pa.Schema:
    """`WORK_SCHEMA` plus `embed_fields`."""
    return pa.schema(list(WORK_SCHEMA) + list(embed_fields(dim)))


def embeds_array(
    values: np.ndarray | None,
    *,
    num_rows: int,
    dim: int,
    valid: np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
) -> pa.Array:
    """(num_rows, dim) values -> a fixed-size list column of ``dtype`` (float32 by default) without per-float
    Python objects; rows not ``valid`` are null."""
    flat = np.zeros(num_rows * dim, dtype) if values is None else np.ascontiguousarray(values, dtype).ravel()
    mask = None if valid is None else pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim, mask=mask)


def embeds_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column -> (rows, dim) float32 (null rows as zeros), zero-copy when it can be."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = array.type.list_size
    if array.null_count:
        array = pc.fill_null(array, pa.scalar([0.0] * dim, array.type))
    values = array.flatten() if array.offset else array.values
    return values.to_numpy(zero_copy_only=False).reshape(len(array), dim)


def binary_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """A binary column -> one read-only uint8 numpy view per row (None where null), without copying the values.

    (``column[i].as_buffer()`` copies each value into a new scalar first: 0.7 ms per 768x768 image.)
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views: list[np.ndarray | None] = []
    for chunk in chunks:
        if pa.types.is_binary(chunk.type):
            offset_type = np.int32
        elif pa.types.is_large_binary(chunk.type):
            offset_type = np.int64
        else:
            raise TypeError(f"binary_views needs a binary column, got {chunk.type}")
        if not len(chunk):
            continue
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        empty = data_buffer is None or not data_buffer.size
        data = np.empty(0, np.uint8) if empty else np.frombuffer(data_buffer, np.uint8)
        data.flags.writeable = False  # the table's own memory: views must not change it
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        views.extend(data[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(chunk)))
    return views


# What the decoder adds to each row (and the inputs it drops): what the writers turn into outputs. The
# input images stay (mostly URIs): the results record them and the gallery previews a few.
DECODED_FIELDS = (
    pa.field("pixels", pa.binary()),  # (pixel_height, pixel_width, 3) uint8, row-major; null for error rows
    pa.field("pixel_height", pa.int32()),
    pa.field("pixel_width", pa.int32()),
    pa.field("decoder_worker", pa.string()),
    pa.field("decoder_seconds", pa.float64()),  # this image's share of its decoder call's wall time
)
DECODER_DROPS = ("generator_state", "image_embeds_given", "negative_image_embeds_given")

# What the scoring stage (``--score clip``, actors/scorer.py) adds to each decoded row; null where not scored.
SCORE_FIELDS = (
    pa.field("clip_score", pa.float64()),  # max(100 * cos(CLIP image embedding, CLIP text embedding), 0)
    pa.field("score_error", pa.string()),  # why a rendered image has no score (it keeps its image)
    pa.field("score_worker", pa.string()),
    pa.field("score_seconds", pa.float64()),  # this image's share of its scoring call's wall time
)


def to_ipc(table: pa.Table) -> bytes:
    """Serialise a table to Arrow IPC stream bytes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    """Inverse of `to_ipc`."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
