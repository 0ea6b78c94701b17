"""Output formats behind one interface: ``add(key, png, meta, embeddings) -> (uri, member)``, ``close() -> data file``.

Every format writes, per part, one data file that `datasets.load_dataset(OUTPUT)` reads with the
output's dataset card (`jobs.reporting.card`), each image with its metadata (`schemas.results.SAMPLE_SCHEMA`):

- `FilesFormat`: each PNG is written at once to ``images/<part>/<key>.png`` (one object per image);
  `close` writes the part's ``images/<part>/metadata.parquet`` (column ``png_file_name``, which
  `datasets`' imagefolder reads as the image column ``png``, then the metadata).
- `WebDatasetFormat`: samples are spooled to a local file; `close` writes one tar with ``<key>.json``
  (the metadata without nulls, `schemas.results.webdataset_json`: its types never depend on which samples
  come first, so `datasets` loads the tars alone), ``<key>.png``, ``<key>.txt`` (the caption) and,
  with ``--save-embeddings``, ``<key>.npy`` (a (2, D) array: ``image_embeds`` then
  ``negative_image_embeds``) per sample, in key order: the same samples give the same bytes.
- `ParquetFormat`: the same, as one Parquet file: the metadata columns and the PNG bytes in ``png``
  (and ``image_embeds`` / ``negative_image_embeds`` fixed-size list columns with embeddings).

Spooled data files are published whole (`actors.storage.Storage.put_file`) when the part is finalized,
so a crash never leaves a partial part. URIs are relative to the output.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.retry import StorageFullError, no_space
from actors.storage import Storage
from schemas.results import SAMPLE_SCHEMA, webdataset_json, with_pandas_metadata
from schemas.shards import FORMAT_FILES, FORMAT_PARQUET, FORMAT_WEBDATASET, data_key, image_key
from schemas.work import embeds_array

PARQUET_ROW_GROUP_ROWS = 64  # small row groups: readers can stream a shard without holding it whole
EMBEDDING_COLUMNS = ("image_embeds", "negative_image_embeds")


class _Spooled:
    """Samples of part ``part`` appended to a local spool file; `close` writes the data file in key order from it.

    ``data_key`` is the part's data file, relative to the output (`schemas.shards.data_key`).
    """

    suffix = ""
    output_format = ""

    def __init__(self, storage: Storage, *, part: str, spool_dir: str | None = None) -> None:
        self.storage = storage
        self.part = part
        self.data_key = data_key(part, self.output_format)
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
        """Spool one sample; (URI, member) it will have once published."""
        offset = self._spool.tell()
        with self._room():
            self._spool.write(self._spooled(key, png))
        encoded = json.dumps(meta, sort_keys=True, default=str).encode()
        self._entries.append((key, offset, self._spool.tell() - offset, encoded, embeddings))
        return self.data_key, self.member(key)

    def _spooled(self, key: str, png: bytes) -> bytes:
        """What the spool keeps of a PNG (all of it: the data file holds it)."""
        return png

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
        self._spool.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class WebDatasetFormat(_Spooled):
    """``data/<part>.tar``: ``<key>.json``, ``<key>.png``, ``<key>.txt`` (+ ``<key>.npy``) per sample, in key order,
    fixed member metadata. Keys hold no dots, so webdataset and `datasets` split members as written."""

    suffix = ".tar"
    output_format = FORMAT_WEBDATASET

    def member(self, key: str) -> str:
        return f"{key}.png"

    def _write(self, path: str) -> None:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, png, meta, embeddings in self._samples():
                values = webdataset_json(json.loads(meta))  # no null: types that do not depend on sample order
                members = [(f"{key}.json", json.dumps(values, sort_keys=True).encode())]
                if embeddings is not None:
                    buffer = io.BytesIO()
                    np.save(buffer, embeddings, allow_pickle=False)
                    members.append((f"{key}.npy", buffer.getvalue()))
                members += [(f"{key}.png", png), (f"{key}.txt", values["caption"].encode())]
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))


class ParquetFormat(_Spooled):
    """``data/<part>.parquet``: one row per sample, the metadata columns and ``png`` (binary)."""

    suffix = ".parquet"
    output_format = FORMAT_PARQUET
    image_field = pa.field("png", pa.binary())

    def member(self, key: str) -> str:
        return key

    def _image_value(self, key: str, png: bytes) -> Any:
        return png

    def _write(self, path: str) -> None:
        schema = pa.schema([*SAMPLE_SCHEMA, self.image_field])
        shapes = {e[4].shape for e in self._entries if e[4] is not None}
        dtypes = {e[4].dtype for e in self._entries if e[4] is not None}
        if shapes:
            ((_, dim),), (dtype,) = shapes, dtypes
            value = pa.from_numpy_dtype(dtype)
            for name in EMBEDDING_COLUMNS:
                schema = schema.append(pa.field(name, pa.list_(value, dim)))
        schema = with_pandas_metadata(schema)
        with pq.ParquetWriter(path, schema, compression="none") as writer:  # PNG bytes do not compress
            batch: list[tuple[str, bytes, bytes, np.ndarray | None]] = []
            for sample in self._samples():
                batch.append(sample)
                if len(batch) == PARQUET_ROW_GROUP_ROWS:
                    writer.write_table(self._rows(batch, schema))
                    batch = []
            if batch or not self._entries:
                writer.write_table(self._rows(batch, schema))

    def _rows(self, samples: list[tuple[str, bytes, bytes, np.ndarray | None]], schema: pa.Schema) -> pa.Table:
        image = self.image_field.name
        rows = [{**json.loads(meta), image: self._image_value(key, png)} for key, png, meta, _ in samples]
        names = [f.name for f in schema if f.name not in EMBEDDING_COLUMNS]
        table = pa.Table.from_pylist(rows, schema=pa.schema([schema.field(name) for name in names]))
        for k, name in enumerate(EMBEDDING_COLUMNS if EMBEDDING_COLUMNS[0] in schema.names else ()):
            field = schema.field(name)
            dim, dtype = field.type.list_size, field.type.value_type.to_pandas_dtype()
            present = np.array([e is not None for *_, e in samples], dtype=bool)
            values = np.zeros((len(samples), dim), dtype)
            for i in np.flatnonzero(present):
                values[i] = samples[i][3][k]
            array = embeds_array(values, num_rows=len(samples), dim=dim, valid=present, dtype=dtype)
            table = table.append_column(field, array)
        return table.replace_schema_metadata(schema.metadata)


class FilesFormat(ParquetFormat):
    """One PNG object per image, written at once to ``images/<part>/<key>.png``; `close` writes the part's
    ``metadata.parquet`` beside them (``png_file_name``: the PNG's name in that folder, then the metadata)."""

    output_format = FORMAT_FILES
    image_field = pa.field("png_file_name", pa.string())

    def add(self, key: str, png: bytes, meta: dict[str, Any], embeddings: np.ndarray | None = None) -> tuple[str, None]:
        """Write the PNG now (atomically); its URI (no member)."""
        uri = image_key(self.part, meta["id"], meta["image_index"])
        self.storage.write_bytes(uri, png)
        super().add(key, png, meta, embeddings)
        return uri, None

    def _spooled(self, key: str, png: bytes) -> bytes:
        return b""  # the PNG is on storage already

    def _image_value(self, key: str, png: bytes) -> Any:
        return f"{key}.png"  # the basename of its `image_key`, relative to the metadata file's folder


FORMATS = {FORMAT_FILES: FilesFormat, FORMAT_WEBDATASET: WebDatasetFormat, FORMAT_PARQUET: ParquetFormat}
