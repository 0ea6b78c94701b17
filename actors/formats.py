"""Output formats behind one interface: ``add(key, png, meta) -> (uri, member)`` per image, ``close() -> data file``.

- `FilesFormat`: each PNG is written at once to ``images/<h2>/<key>.png`` (one object per image).
- `WebDatasetFormat`: samples are spooled to a local file; `close` writes one tar with ``<key>.png``
  and ``<key>.json`` per sample, in key order (the same samples always give the same bytes).
- `ParquetFormat`: the same, as one Parquet file with the PNG bytes in the binary column ``png``.

Spooled formats publish nothing until the shard is finalized: the data file is uploaded whole
(`actors.storage.Storage.put_file`), so a crash never leaves a partial shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actors.storage import Storage
from schemas.keys import id_digest
from schemas.shards import FORMAT_FILES, FORMAT_PARQUET, FORMAT_WEBDATASET

# Columns of the parquet format besides ``key`` and ``png``: the sample's metadata, as in its webdataset json.
PARQUET_ROW_GROUP_ROWS = 64  # small row groups: readers can stream a shard without holding it whole


class FilesFormat:
    """One PNG object per image under ``images/``; nothing to publish at `close`."""

    data_file = None

    def __init__(self, storage: Storage, **_: Any) -> None:
        self.storage = storage

    def add(self, key: str, png: bytes, meta: dict[str, Any]) -> tuple[str, str | None]:
        """Write the PNG now (atomically); its URI."""
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
        self._entries: list[tuple[str, int, int, bytes]] = []  # key, offset, size, json

    def add(self, key: str, png: bytes, meta: dict[str, Any]) -> tuple[str, str]:
        """Spool one sample; (data file URI, member) it will have once published."""
        offset = self._spool.tell()
        self._spool.write(png)
        self._entries.append((key, offset, len(png), json.dumps(meta, sort_keys=True, default=str).encode()))
        return self.data_uri, self.member(key)

    def member(self, key: str) -> str:
        raise NotImplementedError

    def _samples(self) -> Any:
        for key, offset, size, meta in sorted(self._entries):
            self._spool.seek(offset)
            yield key, self._spool.read(size), meta

    def close(self) -> str:
        """Write the data file next to the spool; its local path (the caller uploads it, then `abandon`)."""
        self._spool.flush()
        path = os.path.join(self._dir, "data" + self.suffix)
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
            for key, png, meta in self._samples():
                for name, data in ((f"{key}.png", png), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))


class ParquetFormat(_Spooled):
    """``<shard>.parquet``: one row per sample, ``key``, the metadata columns and ``png`` (binary)."""

    suffix = ".parquet"

    def member(self, key: str) -> str:
        return key

    def _write(self, path: str) -> None:
        writer: pq.ParquetWriter | None = None
        rows: list[dict[str, Any]] = []
        try:
            for key, png, meta in self._samples():
                rows.append({"key": key, **json.loads(meta), "png": png})
                if len(rows) == PARQUET_ROW_GROUP_ROWS:
                    writer = _write_rows(writer, path, rows)
                    rows = []
            writer = _write_rows(writer, path, rows) if rows or writer is None else writer
        finally:
            if writer is not None:
                writer.close()


def _write_rows(writer: pq.ParquetWriter | None, path: str, rows: list[dict[str, Any]]) -> pq.ParquetWriter:
    table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
    if writer is None:
        writer = pq.ParquetWriter(path, PARQUET_SCHEMA, compression="none")  # PNG bytes do not compress
    writer.write_table(table, row_group_size=PARQUET_ROW_GROUP_ROWS)
    return writer


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
        ("png", pa.binary()),
    ]
)
SAMPLE_META = tuple(name for name in PARQUET_SCHEMA.names if name not in ("key", "png"))

FORMATS = {FORMAT_FILES: FilesFormat, FORMAT_WEBDATASET: WebDatasetFormat, FORMAT_PARQUET: ParquetFormat}
