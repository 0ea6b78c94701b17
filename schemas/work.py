"""Work items: one row per output image, as it travels driver -> prior -> decoder -> results.

A planned batch is an Arrow table of `WORK_SCHEMA` rows that one pipeline call can serve; it
crosses actor boundaries as Arrow IPC bytes (`to_ipc` / `from_ipc`), so only bytes travel.
The prior adds the `EMBED_FIELDS`; a row whose ``error`` is set is passed through untouched.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.manifest import IMAGE_REF, INTERPOLATE_TYPE

# Parameters that must be equal for every row of one pipeline call (the batch key).
CALL_KEY = (
    "mode",
    "prior_kind",
    "inputs_key",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "prior_num_inference_steps",
    "prior_guidance_scale",
    "strength",
    "prior_strength",
    "has_negative_prompt",
)

WORK_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64()),  # null only on rows refused for a bad seed
        pa.field("key", pa.string(), nullable=False),  # output image key relative to the output prefix
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
        # "" except for inpaint, where diffusers 0.42.1 blends image[:1]/mask[:1] into every row of a
        # call: only rows with the same image and mask may share one (KANDINSKY_NOTES.md).
        pa.field("inputs_key", pa.string(), nullable=False),
        pa.field("image", IMAGE_REF),
        pa.field("mask", IMAGE_REF),
        pa.field("hint", IMAGE_REF),  # given, or a depth map (PNG bytes) added by the depth stage
        pa.field("prior_image", IMAGE_REF),
        pa.field("interpolate", INTERPOLATE_TYPE),
        pa.field("manifest_file", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
    ]
)

EMBED_FIELDS = (
    pa.field("image_embeds", pa.list_(pa.float32())),
    pa.field("negative_image_embeds", pa.list_(pa.float32())),
    pa.field("generator_state", pa.binary()),  # torch CPU generator state after the prior
    pa.field("prior_worker", pa.string()),
    pa.field("prior_seconds", pa.float64()),  # this image's share of its prior call's wall time
)
EMBED_SCHEMA = pa.schema(list(WORK_SCHEMA) + list(EMBED_FIELDS))


def to_ipc(table: pa.Table) -> bytes:
    """Serialise a table to Arrow IPC stream bytes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    """Inverse of `to_ipc`."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
