"""Output formats behind one interface: ``add(key, png, meta, embeddings) -> (uri, member)``, ``close() -> data file``.

- `FilesFormat`: each PNG is written at once to ``images/<h2>/<key>.png`` (one object per image).
- `WebDatasetFormat`: samples are spooled to a local file; `close` writes one tar with ``<key>.png``
  and ``<key>.json`` per sample (and ``<key>.npy`` with ``--save-embeddings``: a (2, D) array,
  ``image_embeds`` then ``negative_image_embeds``), in key order: the same samples give the same bytes.
- `ParquetFormat`: the same, as one Parquet file with the PNG bytes in the binary column ``png``
  (and ``image_embeds`` / ``negative_image_embeds`` fixed-size list columns with embeddings).

Spooled formats publish nothing until the shard is finalized: the data file is uploaded whole
(`actors.storage.Storage.put_file`), so a crash never leaves a partial shard.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.retry import StorageFullError, no_space
from actors.storage import Storage
from schemas.keys import id_digest
from schemas.shards import FORMAT_FILES, FORMAT_PARQUET, FORMAT_WEBDATASET
from schemas.work import embeds_array

# Columns of the parquet format besides ``key`` and ``png``: the sample's metadata, as in its webdataset json.
PARQUET_ROW_GROUP_ROWS = 64  # small row groups: readers can stream a shard without holding it whole


class FilesFormat:
    """One PNG object per image under ``images/``; nothing to publish at `close`."""

    def __init__(self, storage: Storage, **_: Any) -> None:
        self.storage = storage

    def add(
        self, key: str, png: bytes, meta: dict[str, Any], embeddings: np.ndarray | None = None
    ) -> tuple[str, str | None]:
        """Write the PNG now (atomically); its URI. Embeddings go to the results table only."""
        return self.storage.write_bytes(f"images/{id_digest(meta['id'])[:2]}/{key}.png", png), None

    def close(self) -> str | None:
        """Nothing spooled."""
        return None

    def abandon(self) -> None:
        """Nothing spooled."""


class _Spooled:
    """Samples appended to a local spool file; `close` writes the data file in key order from it."""

    suffix = ""

    def __init__(self, storage: Storage, *, data_uri: str, spool_dir: str | None = None) -> None:
        self.storage = storage
        self.data_uri = data_uri
        self._dir = tempfile.mkdtemp(prefix="kandinsky-shard-", dir=spool_dir)
        self._spool = open(os.path.join(self._dir, "spool"), "w+b")
        self._entries: list[tuple[str, int, int, bytes, np.ndarray | None]] = []  # key, offset, size, json, embeds

    @contextlib.contextmanager
    def _room(self) -> Iterator[None]:
        """A full spool disk stops the job naming the spool folder: it is not the fault of the image being added."""
        try:
            yield
        except OSError as exc:
            if not no_space(exc):
                raise
            raise StorageFullError(
                f"spool {self._dir}: no space left on the device ({exc.strerror or exc}); give --spool-dir a "
                "folder with room for a few shards' images and rerun: a rerun finishes the work"
            ) from exc

    def add(self, key: str, png: bytes, meta: dict[str, Any], embeddings: np.ndarray | None = None) -> tuple[str, str]:
        """Spool one sample; (data file URI, member) it will have once published."""
        offset = self._spool.tell()
        with self._room():
            self._spool.write(png)
        encoded = json.dumps(meta, sort_keys=True, default=str).encode()
        self._entries.append((key, offset, len(png), encoded, embeddings))
        return self.data_uri, self.member(key)

    def member(self, key: str) -> str:
        raise NotImplementedError

    def _samples(self) -> Any:
        for key, offset, size, meta, embeddings in sorted(self._entries, key=lambda entry: entry[0]):
            self._spool.seek(offset)
            yield key, self._spool.read(size), meta, embeddings

    def close(self) -> str:
        """Write the data file next to the spool; its local path (the caller uploads it, then `abandon`)."""
        path = os.path.join(self._dir, "data" + self.suffix)
        with self._room():
            self._spool.flush()
            self._write(path)
        return path

    def _write(self, path: str) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """Remove the spool and any data file built from it."""
        import shutil

        self._spool.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class WebDatasetFormat(_Spooled):
    """``<shard>.tar``: ``<key>.png`` + ``<key>.json`` per sample, in key order, fixed member metadata."""

    suffix = ".tar"

    def member(self, key: str) -> str:
        return f"{key}.png"

    def _write(self, path: str) -> None:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, png, meta, embeddings in self._samples():
                members = [(f"{key}.png", png), (f"{key}.json", meta)]
                if embeddings is not None:
                    buffer = io.BytesIO()
                    np.save(buffer, embeddings, allow_pickle=False)
                    members.append((f"{key}.npy", buffer.getvalue()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))


class ParquetFormat(_Spooled):
    """``<shard>.parquet``: one row per sample, ``key``, the metadata columns and ``png`` (binary)."""

    suffix = ".parquet"

    def member(self, key: str) -> str:
        return key

    def _write(self, path: str) -> None:
        shapes = {e[4].shape for e in self._entries if e[4] is not None}
        dtypes = {e[4].dtype for e in self._entries if e[4] is not None}
        schema = PARQUET_SCHEMA
        if shapes:
            ((_, dim),), (dtype,) = shapes, dtypes
            value = pa.from_numpy_dtype(dtype)
            schema = schema.append(pa.field("image_embeds", pa.list_(value, dim)))
            schema = schema.append(pa.field("negative_image_embeds", pa.list_(value, dim)))
        with pq.ParquetWriter(path, schema, compression="none") as writer:  # PNG bytes do not compress
            batch: list[tuple[str, bytes, bytes, np.ndarray | None]] = []
            for sample in self._samples():
                batch.append(sample)
                if len(batch) == PARQUET_ROW_GROUP_ROWS:
                    writer.write_table(_rows(batch, schema))
                    batch = []
            if batch or not self._entries:
                writer.write_table(_rows(batch, schema))


def _rows(samples: list[tuple[str, bytes, bytes, np.ndarray | None]], schema: pa.Schema) -> pa.Table:
    rows = [{"key": key, **json.loads(meta), "png": png} for key, png, meta, _ in samples]
    table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
    if "image_embeds" in schema.names:
        for k, name in enumerate(("image_embeds", "negative_image_embeds")):
            field = schema.field(name)
            dim, dtype = field.type.list_size, field.type.value_type.to_pandas_dtype()
            present = np.array([e is not None for *_, e in samples], dtype=bool)
            values = np.zeros((len(samples), dim), dtype)
            for i in np.flatnonzero(present):
                values[i] = samples[i][3][k]
            array = embeds_array(values, num_rows=len(samples), dim=dim, valid=present, dtype=dtype)
            table = table.append_column(field, array)
    return table


PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("image_index", pa.int32()),
        ("seed", pa.int64()),
        ("mode", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("prior_num_inference_steps", pa.int32()),
        ("prior_guidance_scale", pa.float64()),
        ("strength", pa.float64()),
        ("manifest_file", pa.string()),
        ("run_id", pa.string()),
        ("clip_score", pa.float64()),
        ("filtered", pa.bool_()),
        ("png", pa.binary()),
    ]
)
SAMPLE_META = tuple(name for name in PARQUET_SCHEMA.names if name not in ("key", "png"))

FORMATS = {FORMAT_FILES: FilesFormat, FORMAT_WEBDATASET: WebDatasetFormat, FORMAT_PARQUET: ParquetFormat}
