"""Duplicate images by construction: images whose prompt inputs, settings and seed repeat another's.

Image ``i`` of a row uses seed ``seed + i``, so rows with consecutive seeds and ``num_images > 1`` (or
the same row under two ids) ask for the very same image twice. Each planned image gets a 128-bit
signature of everything that decides its pixels (`image_signatures`); signatures go to hash
partitions on local disk, so memory stays bounded by one shard whatever the run's size, and at the
end each partition is sorted on its own to count the repeats and name a few (`DuplicateImages`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.modes import MODES, PRIOR_KINDS
from schemas.recorded import describe_input, interpolate_items
from schemas.summary import ImageKey

# Work columns that decide an image's pixels (with the seed): parameters a row's mode or prior input
# does not use are left out (`schemas.recorded.recorded_parameters` records them as null).
TEXT_COLUMNS = ("mode", "prior_kind", "prompt", "negative_prompt")
NUMBER_COLUMNS = ("seed", "height", "width", "num_inference_steps", "guidance_scale")
IMAGE_COLUMNS = ("image", "mask", "hint", "prior_image")
_HASH_KEYS = ("kandinsky-dup-a01", "kandinsky-dup-b02")  # pandas wants 16 characters: sliced below
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_ROWS_PER_PARTITION = 1 << 21  # 32 MB of signatures per partition
_MAX_PARTITIONS = 128
EXAMPLES = 5  # duplicate groups named
EXAMPLE_MEMBERS = 3  # images named per group
_SPILL_ROWS = 1 << 16  # images buffered before they go to their partitions (a few MB)
_NAMES = pa.schema([("id", pa.string()), ("image_index", pa.int32())])  # beside the signatures, in the same order


def _masked(work: pa.Table, name: str, used: pa.ChunkedArray) -> pa.ChunkedArray:
    """Column ``name`` where ``used``, else null (a value nothing reads)."""
    column = work.column(name)
    return pc.if_else(used, column, pa.scalar(None, column.type))


def _parameter_columns(work: pa.Table) -> list[pa.ChunkedArray]:
    """The numeric parameters, each null where the row's mode or prior input does not use it."""
    partial = [name for name, mode in MODES.items() if mode.partial_schedule]
    prior_partial = [name for name, kind in PRIOR_KINDS.items() if kind.partial_schedule]
    no_prior = [name for name, kind in PRIOR_KINDS.items() if kind.pipeline is None]
    uses_strength = pc.is_in(work.column("mode"), value_set=pa.array(partial, pa.string()))
    uses_prior_strength = pc.is_in(work.column("prior_kind"), value_set=pa.array(prior_partial, pa.string()))
    uses_prior = pc.invert(pc.is_in(work.column("prior_kind"), value_set=pa.array(no_prior, pa.string())))
    return [
        *(work.column(name) for name in NUMBER_COLUMNS),
        _masked(work, "strength", uses_strength),
        _masked(work, "prior_strength", uses_prior_strength),
        _masked(work, "prior_num_inference_steps", uses_prior),
        _masked(work, "prior_guidance_scale", uses_prior),
    ]


def _described(work: pa.Table) -> list[np.ndarray]:
    """Input images (recorded form: URI or digest; an estimated hint as its source image decides it),
    interpolation items and given embeddings, as one string per row (None where absent)."""
    columns = []
    estimated = work.column("hint_estimated").to_numpy(zero_copy_only=False)
    for name in IMAGE_COLUMNS:
        refs = work.column(name).combine_chunks()
        values = pc.struct_field(refs, "uri").to_numpy(zero_copy_only=False).astype(object)
        inline = refs.is_valid().to_numpy(zero_copy_only=False) & np.array([not uri for uri in values])
        for i in np.flatnonzero(inline):  # inline bytes: their digest (rare; the depth stage's come later)
            values[i] = describe_input(refs[int(i)].as_py())
        if name == "hint":
            values[estimated] = None
        columns.append(values)
    items = work.column("interpolate")
    values = np.full(work.num_rows, None, dtype=object)
    for i in np.flatnonzero(items.is_valid().to_numpy(zero_copy_only=False)):
        values[i] = json.dumps(interpolate_items(items[int(i)].as_py()), sort_keys=True)
    columns.append(values)
    for name in ("image_embeds_given", "negative_image_embeds_given"):
        columns.append(_embedding_digests(work.column(name).combine_chunks()))
    return columns


def _embedding_digests(array: pa.ListArray) -> np.ndarray:
    """A digest of each row's float32 values (None where null), without a Python object per float."""
    digests = np.full(len(array), None, dtype=object)
    valid = np.flatnonzero(array.is_valid().to_numpy(zero_copy_only=False))
    if not len(valid):
        return digests
    offsets = array.offsets.to_numpy()
    values = np.ascontiguousarray(array.values.to_numpy(zero_copy_only=False), dtype=np.float32)
    for i in valid:
        digests[i] = hashlib.blake2b(values[offsets[i] : offsets[i + 1]].tobytes(), digest_size=16).hexdigest()
    return digests


def _joined(columns: list[pa.ChunkedArray | pa.Array | np.ndarray]) -> np.ndarray:
    """One string per row holding every column's value, unambiguously: ``<length>:<value>`` or ``-`` (null),
    separated by ``|`` (so no two different rows of values give the same string)."""
    fields = []
    for column in columns:
        column = pa.array(column, pa.string()) if isinstance(column, np.ndarray) else column.cast(pa.string())
        prefix = pc.binary_join_element_wise(pc.utf8_length(column).cast(pa.string()), column, ":")
        fields.append(pc.fill_null(prefix, "-"))
    return pc.binary_join_element_wise(*fields, "|").to_numpy(zero_copy_only=False)


def image_signatures(work: pa.Table) -> np.ndarray:
    """(rows, 2) uint64: a 128-bit signature of each work row's prompt inputs, settings and seed."""
    import pandas as pd

    texts = _joined([work.column(name) for name in TEXT_COLUMNS] + _described(work))
    numbers = []
    for column in _parameter_columns(work):
        if pa.types.is_integer(column.type):  # null: a value no renderable row has
            numbers.append(pc.fill_null(column.cast(pa.int64()), -(2**63)).to_numpy().view(np.uint64))
        else:
            floats = pc.fill_null(column.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
            numbers.append(np.where(np.isnan(floats), np.nan, floats + 0.0).view(np.uint64))  # -0.0 == 0.0
    signatures = np.zeros((work.num_rows, 2), np.uint64)
    for k, key in enumerate(_HASH_KEYS):
        salt = np.uint64(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
        h = pd.util.hash_array(texts, hash_key=key[:16], categorize=False)
        for values in numbers:
            h = h * _MULTIPLIER + pd.util.hash_array(values ^ salt, categorize=False)
        signatures[:, k] = h
    return signatures


def _remove(folder: str, handles: list[Any]) -> None:
    for handle in handles:
        handle.close()
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class Duplicates:
    """What `DuplicateImages` found: images counted, images repeating an earlier one, a few groups by name."""

    num_images: int
    num_repeated: int  # images whose prompt inputs, settings and seed equal another image's
    examples: tuple[tuple[ImageKey, ...], ...] = ()  # up to `EXAMPLES` groups of equal images

    def as_dict(self) -> dict[str, Any]:
        """The form stats.json holds."""
        return {
            "num_images": self.num_images,
            "num_repeated": self.num_repeated,
            "examples": [[list(key) for key in group] for group in self.examples],
        }

    def line(self) -> str:
        """One line for people: the count and the groups named."""
        groups = "; ".join(" = ".join(f"{row_id} #{index}" for row_id, index in group) for group in self.examples)
        return f"{self.num_repeated} of {self.num_images} image(s)" + (f", e.g. {groups}" if groups else "")


class DuplicateImages:
    """Counts the images whose signature (`image_signatures`) repeats, over work added one shard at a time.

    ``num_images`` (an estimate is enough) sizes the partitions; the scratch files live under
    ``scratch_dir`` (default: the system's temporary folder) until `finish`.
    """

    def __init__(self, *, num_images: int, scratch_dir: str | None = None) -> None:
        wanted = max(1, min(_MAX_PARTITIONS, -(-num_images // _ROWS_PER_PARTITION)))
        self._bits = int(np.ceil(np.log2(wanted)))
        self._dir = tempfile.mkdtemp(prefix="kandinsky-duplicates-", dir=scratch_dir)
        count = 1 << self._bits
        self._signatures = [open(os.path.join(self._dir, f"{p:03d}.sig"), "wb") for p in range(count)]
        self._sinks = [pa.OSFile(os.path.join(self._dir, f"{p:03d}.names"), "wb") for p in range(count)]
        self._names = [pa.ipc.new_stream(sink, _NAMES) for sink in self._sinks]
        self._buffered: list[tuple[np.ndarray, pa.Table]] = []  # small shards are spilled together
        self._num_buffered = 0
        self.num_images = 0
        # A run that fails before `finish` leaves no scratch files behind either.
        self._cleanup = weakref.finalize(self, _remove, self._dir, [*self._signatures, *self._sinks])

    def add(self, work: pa.Table) -> None:
        """Count the images of ``work`` (renderable `schemas.work.WORK_SCHEMA` rows)."""
        if not work.num_rows:
            return
        self._buffered.append((image_signatures(work), work.select(_NAMES.names).cast(_NAMES)))
        self._num_buffered += work.num_rows
        self.num_images += work.num_rows
        if self._num_buffered >= _SPILL_ROWS:
            self._spill()

    def _spill(self) -> None:
        """Write the buffered signatures (and names, in the same order) to their partitions."""
        if not self._buffered:
            return
        signatures = np.concatenate([s for s, _ in self._buffered])
        names = pa.concat_tables([n for _, n in self._buffered])
        self._buffered, self._num_buffered = [], 0
        partition = (signatures[:, 0] >> np.uint64(64 - self._bits)).astype(np.int64) if self._bits else None
        if partition is None:
            order, bounds = np.arange(len(signatures)), np.array([0, len(signatures)])
        else:
            order = np.argsort(partition, kind="stable")
            bounds = np.searchsorted(partition[order], np.arange(len(self._signatures) + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[p] : bounds[p + 1]]
            signatures[rows].tofile(self._signatures[p])
            self._names[p].write_table(names.take(pa.array(rows, pa.int64())))

    def finish(self) -> Duplicates:
        """Sort each partition, count the repeats, name the first groups; removes the scratch files."""
        try:
            self._spill()
            for writer in self._names:
                writer.close()
            repeated, examples = 0, []
            for p in range(len(self._signatures)):
                self._signatures[p].close()
                self._sinks[p].close()
                values = np.fromfile(os.path.join(self._dir, f"{p:03d}.sig"), dtype=np.uint64).reshape(-1, 2)
                order = np.lexsort((values[:, 1], values[:, 0]))
                ordered = values[order]
                same = np.zeros(len(ordered), dtype=bool)
                same[1:] = np.all(ordered[1:] == ordered[:-1], axis=1)
                repeated += int(same.sum())
                if same.any() and len(examples) < EXAMPLES:
                    examples += self._groups(p, order, same, EXAMPLES - len(examples))
            return Duplicates(num_images=self.num_images, num_repeated=repeated, examples=tuple(examples))
        finally:
            self._cleanup()

    def _groups(self, partition: int, order: np.ndarray, same: np.ndarray, limit: int) -> list[tuple[ImageKey, ...]]:
        """The first ``limit`` groups of equal signatures in a sorted partition, by name (read back from disk)."""
        starts = np.flatnonzero(same[1:] & ~same[:-1])[:limit]  # each group's first image, in sorted order
        groups = []
        for start in starts:
            stop = start + 1
            while stop < len(same) and same[stop]:
                stop += 1
            groups.append(sorted(order[start:stop][:EXAMPLE_MEMBERS].tolist()))
        wanted = sorted({row for group in groups for row in group})
        names = pa.ipc.open_stream(os.path.join(self._dir, f"{partition:03d}.names")).read_all()
        chosen = names.take(pa.array(wanted, pa.int64())).to_pylist()
        found = {row: (name["id"], name["image_index"]) for row, name in zip(wanted, chosen)}
        return [tuple(found[row] for row in group) for group in groups]
