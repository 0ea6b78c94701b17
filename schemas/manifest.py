"""Manifest contract: the columns of a render request, their types, defaults and limits, and schema checks.

Two kinds of problems are told apart:
- a malformed manifest (missing ``id``, a column of the wrong type, null or duplicate ids, unknown
  modes, an unreadable file) raises `ManifestError` before any model work (here);
- a well-formed row with a bad value (no prompt, a size over the limits, a missing input) becomes
  an ``error`` result row (`schemas.validation`), and every other row still renders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.columns import float_integers
from schemas.modes import DEFAULT_MODE, MODE_NAMES
from schemas.numbers import check_range
from schemas.text import quoted

# An image input: a URI (any allowed fsspec protocol; relative paths resolve against the manifest's
# folder) or the encoded bytes inline. Exactly one field is set.
IMAGE_REF = pa.struct([("uri", pa.string()), ("data", pa.binary())])
INTERPOLATE_TYPE = pa.list_(pa.struct([("prompt", pa.string()), ("image", IMAGE_REF), ("weight", pa.float64())]))
DEFAULT_MAX_INPUT_PIXELS = 40_000_000
# Above any encoded image within the pixel limit: 40 MP of RGBA is 160 MB uncompressed.
DEFAULT_MAX_INPUT_BYTES = 200_000_000
# Input URI protocols allowed by default (--allowed-protocols auto): object stores always; the
# worker's own files only for a manifest that is itself local (a manifest on a bucket must not make
# the cluster read /etc or /proc/self/environ and hand them back as images).
OBJECT_STORE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
LOCAL_PROTOCOLS = ("file", "local")
AUTO_PROTOCOLS = "auto"
# What an input loader allows when nobody says (actors built outside a job, tests): a local manifest's set.
DEFAULT_ALLOWED_PROTOCOLS = OBJECT_STORE_PROTOCOLS + LOCAL_PROTOCOLS


@dataclass(frozen=True, kw_only=True)
class ManifestColumn:
    """One manifest column: its name, the kind of values it holds and what it means."""

    name: str
    kind: str  # "string" | "int" | "float" | "image" | "interpolate" | "embedding"
    required: bool = False
    description: str


MANIFEST_COLUMNS: tuple[ManifestColumn, ...] = (
    ManifestColumn(name="id", kind="string", required=True, description="unique row id; names the outputs"),
    ManifestColumn(
        name="mode", kind="string", description=f"one of {', '.join(MODE_NAMES)}; null means {DEFAULT_MODE}"
    ),
    ManifestColumn(name="prompt", kind="string", description="text prompt for the prior"),
    ManifestColumn(name="negative_prompt", kind="string", description="negative prompt; null: none"),
    ManifestColumn(name="image", kind="image", description="source image (img2img, inpaint, controlnet*)"),
    ManifestColumn(name="mask", kind="image", description="inpaint mask: white = repaint, black = keep"),
    ManifestColumn(name="hint", kind="image", description="ControlNet depth hint; null: estimated"),
    ManifestColumn(name="prior_image", kind="image", description="image guiding the prior (PriorEmb2Emb)"),
    ManifestColumn(name="prior_strength", kind="float", description="PriorEmb2Emb strength"),
    ManifestColumn(
        name="interpolate", kind="interpolate", description="list of {prompt, image, weight} mixed by the prior"
    ),
    ManifestColumn(
        name="image_embeds", kind="embedding", description="CLIP image embedding to render from, skipping the prior"
    ),
    ManifestColumn(
        name="negative_image_embeds",
        kind="embedding",
        description="negative embedding with image_embeds; null: the prior's zero-image embedding",
    ),
    ManifestColumn(name="seed", kind="int", description="seed of image 0; image i uses seed + i"),
    ManifestColumn(name="num_images", kind="int", description="images rendered for this row"),
    ManifestColumn(name="height", kind="int", description="output height in pixels"),
    ManifestColumn(name="width", kind="int", description="output width in pixels"),
    ManifestColumn(name="num_inference_steps", kind="int", description="decoder denoising steps"),
    ManifestColumn(name="guidance_scale", kind="float", description="decoder classifier-free guidance"),
    ManifestColumn(name="prior_num_inference_steps", kind="int", description="prior denoising steps"),
    ManifestColumn(name="prior_guidance_scale", kind="float", description="prior classifier-free guidance"),
    ManifestColumn(name="strength", kind="float", description="img2img-family strength"),
)
COLUMNS_BY_NAME = {column.name: column for column in MANIFEST_COLUMNS}
IMAGE_COLUMNS = tuple(c.name for c in MANIFEST_COLUMNS if c.kind == "image")
# Image columns the decoder reads (the rest guide the prior).
DECODER_IMAGE_COLUMNS = ("image", "mask", "hint")

EMBEDDING_TYPE = pa.list_(pa.float32())  # given embeddings, normalized; checked against the prior's size per row
# The column `normalize` adds: per row, why one of its values could not take its column's type (else null).
VALUE_PROBLEM = "__value_problem__"
_CANONICAL_TYPES = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "image": pa.string(),
    "embedding": EMBEDDING_TYPE,
}


@dataclass(frozen=True, kw_only=True)
class RenderDefaults:
    """Values that null manifest parameters take: diffusers' own defaults for Kandinsky 2.2."""

    num_images: int = dataclasses.field(default=1, metadata={"help": "num_images of rows where it is null"})
    height: int = dataclasses.field(default=512, metadata={"help": "height of rows where it is null"})
    width: int = dataclasses.field(default=512, metadata={"help": "width of rows where it is null"})
    num_inference_steps: int = dataclasses.field(
        default=100, metadata={"help": "num_inference_steps of rows where it is null"}
    )
    guidance_scale: float = dataclasses.field(default=4.0, metadata={"help": "guidance_scale of rows where it is null"})
    prior_num_inference_steps: int = dataclasses.field(
        default=25, metadata={"help": "prior_num_inference_steps of rows where it is null"}
    )
    prior_guidance_scale: float = dataclasses.field(
        default=4.0, metadata={"help": "prior_guidance_scale of rows where it is null"}
    )
    strength: float = dataclasses.field(default=0.3, metadata={"help": "strength of rows where it is null"})
    prior_strength: float = dataclasses.field(default=0.3, metadata={"help": "prior_strength of rows where it is null"})


def _protocol_list(text: str) -> tuple[str, ...] | None:
    """``--allowed-protocols`` text: comma-separated protocols, or ``auto`` (None: decided by the manifest's)."""
    if text.strip().lower() == AUTO_PROTOCOLS:
        return None
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on row values; a row outside them becomes an ``error`` result (documented in README)."""

    max_num_images: int = dataclasses.field(default=16, metadata={"help": "most images per row (num_images)"})
    max_side: int = dataclasses.field(default=2048, metadata={"help": "largest height and width, in pixels"})
    max_num_inference_steps: int = dataclasses.field(
        default=1000, metadata={"help": "most denoising steps (num_inference_steps, prior_num_inference_steps)"}
    )
    max_guidance_scale: float = dataclasses.field(
        default=100.0, metadata={"help": "largest guidance_scale and prior_guidance_scale"}
    )
    max_prompt_chars: int = dataclasses.field(
        default=10_000, metadata={"help": "longest prompt and negative_prompt, in characters"}
    )
    max_input_pixels: int = dataclasses.field(
        default=DEFAULT_MAX_INPUT_PIXELS,
        metadata={"help": "decoded input images above this many pixels are refused (decompression bombs)"},
    )
    max_input_bytes: int = dataclasses.field(
        default=DEFAULT_MAX_INPUT_BYTES,
        metadata={"help": "input images (files, objects, inline bytes) larger than this many bytes are refused"},
    )
    max_interpolate_items: int = dataclasses.field(default=16, metadata={"help": "most interpolate items per row"})
    allowed_protocols: tuple[str, ...] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "protocols input image URIs may use, comma-separated (file: local paths of the worker that "
            "reads them); auto: the default",
            "default_help": f"{AUTO_PROTOCOLS}: {','.join(OBJECT_STORE_PROTOCOLS)}, and {','.join(LOCAL_PROTOCOLS)} "
            "only when the manifest itself is local",
            "parse": _protocol_list,
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_input_pixels", "max_input_bytes", "max_prompt_chars", "max_interpolate_items"):
            check_range(name, getattr(self, name), low=1)
        check_range("max_num_images", self.max_num_images, low=1, high=1024)
        check_range("max_side", self.max_side, low=1, high=16384)
        check_range("max_num_inference_steps", self.max_num_inference_steps, low=1, high=100_000)
        check_range("max_guidance_scale", self.max_guidance_scale, low=0)
        if self.allowed_protocols is not None and not self.allowed_protocols:
            raise ValueError("allowed_protocols: name at least one protocol (or auto)")


def uri_protocol(uri: str) -> str:
    """The fsspec protocol of ``uri`` (``file`` for plain paths); chained URIs give the outermost one."""
    head, sep, _ = uri.partition("://")
    return head.split("::")[0].lower() if sep else "file"


def input_protocols(limits: Limits, *, manifest: str) -> tuple[str, ...]:
    """The protocols input URIs of rows read from ``manifest`` may use: ``limits.allowed_protocols`` when set,
    else (auto) the object stores', plus local paths only when ``manifest`` is itself local."""
    if limits.allowed_protocols is not None:
        return limits.allowed_protocols
    local = uri_protocol(manifest) in LOCAL_PROTOCOLS
    return OBJECT_STORE_PROTOCOLS + (LOCAL_PROTOCOLS if local else ())


class ManifestError(ValueError):
    """A manifest that cannot be rendered at all; the message names file, column, row ids and values."""


def _describe(values: Sequence[object], ids: Sequence[object], *, limit: int = 5) -> str:
    shown = [f"id={quoted(row_id)} value={quoted(value)}" for row_id, value in list(zip(ids, values))[:limit]]
    more = f" (and {len(values) - limit} more)" if len(values) > limit else ""
    return "; ".join(shown) + more


def _accepts(kind: str, arrow_type: pa.DataType) -> bool:
    if pa.types.is_null(arrow_type):
        return True
    if kind == "string":
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if kind == "int":  # floats too: pandas writes an integer column with gaps as float64 (`as_int64`)
        return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
    if kind == "float":
        return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
    if kind == "image":
        return any(
            check(arrow_type)
            for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
        )
    if kind == "interpolate":
        if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
            return False
        item = arrow_type.value_type
        if not pa.types.is_struct(item):
            return False
        fields = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
        return (
            "weight" in fields
            and _accepts("float", fields["weight"])
            and _accepts("string", fields.get("prompt", pa.null()))
            and _accepts("image", fields.get("image", pa.null()))
        )
    if kind == "embedding":
        is_list = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
        return (is_list or pa.types.is_fixed_size_list(arrow_type)) and _accepts("float", arrow_type.value_type)
    raise AssertionError(f"unknown column kind {kind}")


_KIND_WORDS = {
    "string": "string",
    "int": "integer (or integer-valued float)",
    "float": "float or integer",
    "image": "string URI or binary image bytes",
    "interpolate": "list<struct<prompt: string, image: string|binary, weight: float>>",
    "embedding": "list<float> (or a fixed-size list of floats)",
}


def check_schema(schema: pa.Schema, *, file: str) -> None:
    """Raise `ManifestError` when ``id`` is missing or any known column has a type we cannot read."""
    if "id" not in schema.names:
        raise ManifestError(f"{file}: required column 'id' is missing (columns present: {schema.names})")
    for name in schema.names:
        if schema.names.count(name) > 1:
            raise ManifestError(f"{file}: column {name!r} appears more than once")
        column = COLUMNS_BY_NAME.get(name)
        if column is not None and not _accepts(column.kind, schema.field(name).type):
            raise ManifestError(
                f"{file}: column {name!r} has type {schema.field(name).type}, expected {_KIND_WORDS[column.kind]}"
            )


def normalize(table: pa.Table, *, file: str) -> pa.Table:
    """Return the manifest table with every known column present in its canonical type, plus `VALUE_PROBLEM`.

    Unknown columns are dropped. Image columns keep string or binary type; every other column is
    cast to string, int64 or float64. A float in an integer column becomes that integer (NaN: null, the
    default); one that is no exact integer becomes null and its row's `VALUE_PROBLEM` says why (the row
    is refused as ``invalid_row``, `schemas.validation.row_problems`). Raises `ManifestError` for what
    `check_schema` refuses, for null or empty ids and for unknown modes.
    """
    check_schema(table.schema, file=file)
    arrays: dict[str, pa.Array] = {}
    value_problems: list[str | None] = [None] * table.num_rows
    for column in MANIFEST_COLUMNS:
        if column.name in table.column_names:
            array = table.column(column.name).combine_chunks()
            if column.kind == "int" and pa.types.is_floating(array.type):
                array, problems = float_integers(array, name=column.name)
                value_problems = [old or new for old, new in zip(value_problems, problems)]
            elif column.kind in ("string", "int", "float"):
                array = _cast(array, _CANONICAL_TYPES[column.kind], file=file, name=column.name, table=table)
            elif column.kind == "image":
                array = image_refs(array)
            elif column.kind == "interpolate":
                array = _interpolate_items(array)
            elif column.kind == "embedding":
                array = (
                    array.cast(pa.list_(array.type.value_type)) if pa.types.is_fixed_size_list(array.type) else array
                )
                array = array.cast(EMBEDDING_TYPE)
        elif column.kind == "image":
            array = pa.nulls(table.num_rows, IMAGE_REF)
        elif column.kind == "interpolate":
            array = pa.nulls(table.num_rows, INTERPOLATE_TYPE)
        else:
            array = pa.nulls(table.num_rows, _CANONICAL_TYPES[column.kind])
        arrays[column.name] = array
    arrays[VALUE_PROBLEM] = pa.array(value_problems, pa.string())
    normalized = pa.table(arrays)
    _check_ids(normalized, file=file)
    _check_modes(normalized, file=file)
    return normalized


def image_refs(array: pa.Array) -> pa.Array:
    """String URIs or binary bytes (or nulls) -> `IMAGE_REF` structs; null stays null."""
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), IMAGE_REF)
    is_text = pa.types.is_string(array.type) or pa.types.is_large_string(array.type)
    uri = array.cast(pa.string()) if is_text else pa.nulls(len(array), pa.string())
    data = pa.nulls(len(array), pa.binary()) if is_text else array.cast(pa.binary())
    return pa.StructArray.from_arrays([uri, data], fields=list(IMAGE_REF), mask=array.is_null())


def _interpolate_items(array: pa.Array) -> pa.Array:
    rows = []
    for items in array.to_pylist():
        if items is None:
            rows.append(None)
            continue
        rows.append(
            [
                {
                    "prompt": item.get("prompt"),
                    "image": _image_ref(item.get("image")),
                    "weight": None if item.get("weight") is None else float(item["weight"]),
                }
                for item in items
            ]
        )
    return pa.array(rows, INTERPOLATE_TYPE)


def _image_ref(value: str | bytes | None) -> dict | None:
    if value is None:
        return None
    return {"uri": value, "data": None} if isinstance(value, str) else {"uri": None, "data": bytes(value)}


def _cast(array: pa.Array, target: pa.DataType, *, file: str, name: str, table: pa.Table) -> pa.Array:
    if array.type == target:
        return array
    if pa.types.is_integer(target) and not pa.types.is_null(array.type):
        ints = array.cast(pa.int64(), safe=False)
        bad = pc.fill_null(pc.not_equal(ints.cast(array.type, safe=False), array), False)
        if pc.any(bad).as_py():
            ids = table.column("id").filter(bad).to_pylist()
            raise ManifestError(
                f"{file}: column {name!r} holds values out of int64 range: "
                f"{_describe(array.filter(bad).to_pylist(), ids)}"
            )
        return ints
    return array.cast(target)


def _check_ids(table: pa.Table, *, file: str) -> None:
    ids = table.column("id")
    empty = pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True)
    if pc.any(empty).as_py():
        rows = np.flatnonzero(empty.to_numpy(zero_copy_only=False))[:5].tolist()
        raise ManifestError(f"{file}: column 'id' is null or empty at row numbers {rows}")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dupes = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        raise ManifestError(f"{file}: column 'id' has duplicate ids: [{', '.join(quoted(d) for d in dupes[:5])}]")


def _check_modes(table: pa.Table, *, file: str) -> None:
    modes = table.column("mode")
    unknown = pc.and_(modes.is_valid(), pc.invert(pc.is_in(modes, value_set=pa.array(MODE_NAMES))))
    if pc.any(unknown).as_py():
        raise ManifestError(
            f"{file}: column 'mode' has unknown modes (known: {', '.join(MODE_NAMES)}): "
            f"{_describe(modes.filter(unknown).to_pylist(), table.column('id').filter(unknown).to_pylist())}"
        )


def fill_defaults(table: pa.Table, defaults: RenderDefaults) -> pa.Table:
    """Return ``table`` (normalized) with null parameters replaced by ``defaults`` and null modes by text2img."""
    columns = {name: table.column(name) for name in table.column_names}
    columns["mode"] = pc.fill_null(columns["mode"], DEFAULT_MODE)
    for field in dataclasses.fields(defaults):
        columns[field.name] = pc.fill_null(columns[field.name], getattr(defaults, field.name))
    return pa.table(columns)
