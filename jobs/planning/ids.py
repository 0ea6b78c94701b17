"""The id contract over whole manifests in bounded memory: every id present, non-empty and unique across all files.

One streaming pass reads only the ``id`` and ``mode`` columns, batch by batch: null or empty ids and
unknown modes are refused at once; each id's 64-bit hash goes to one of up to 256 partition files on
local disk. Each partition (a few MB) is then sorted on its own, so memory stays bounded by a batch
plus one partition whatever the manifest's size. Equal hashes are confirmed by a second pass that
collects only the ids with those hashes (a collision of different ids is not a duplicate), and real
duplicates are refused naming the id and its files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.retry import Retrier
from actors.storage import open_fs
from jobs.planning.manifests import ManifestFile
from schemas.loggers import logger_for
from schemas.manifest import ManifestError
from schemas.modes import MODE_NAMES
from schemas.text import quoted

logger = logger_for(__name__)

BATCH_ROWS = 131_072
_ROWS_PER_PARTITION = 1 << 20  # 8 MB of hashes per partition
_MAX_PARTITIONS = 256


def files_digest(files: Sequence[ManifestFile]) -> str:
    """A digest of the files' relative paths and fingerprints: unchanged files need no new check."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.relpath):
        fp = file.fingerprint
        identity = "\x00".join(str(part) for part in (file.relpath, fp.size, fp.footer, fp.etag, fp.content))
        digest.update(f"{identity}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def id_batches(file: ManifestFile, storage_options: dict[str, Any] | None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row number, batch of the ``id`` and ``mode`` columns) over the whole file.

    A transient storage error mid-file reopens it at the row group it was reading and skips the rows
    already given out, so every row is yielded exactly once (a repeated row would look like a duplicate id).
    """
    fs, path = open_fs(file.uri, storage_options)
    columns = [name for name in ("id", "mode") if name in file.schema.names]
    starts = np.concatenate([[0], np.cumsum(file.row_group_rows, dtype=np.int64)])
    retrier = Retrier(f"read the ids of {file.uri}")
    row = 0
    while row < file.num_rows:
        group = int(np.searchsorted(starts, row, side="right")) - 1  # the row group holding ``row``
        skip = row - int(starts[group])
        try:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                groups = list(range(group, parquet.metadata.num_row_groups))
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns, row_groups=groups):
                    if skip >= batch.num_rows:
                        skip -= batch.num_rows
                        continue
                    batch, skip = batch.slice(skip), 0
                    yield row, batch
                    row += batch.num_rows
            return
        except Exception as exc:  # noqa: BLE001 - `failed` re-raises what is not transient, or when retries run out
            retrier.failed(exc)


def _hashes(ids: pa.Array) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(ids.to_numpy(zero_copy_only=False), categorize=False)


def _check_batch(file: ManifestFile, first_row: int, batch: pa.RecordBatch) -> pa.Array:
    ids = batch.column("id").cast(pa.string())
    empty = pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True)
    if pc.any(empty).as_py():
        rows = (np.flatnonzero(empty.to_numpy(zero_copy_only=False))[:5] + first_row).tolist()
        raise ManifestError(f"{file.uri}: column 'id' is null or empty at row numbers {rows}")
    if "mode" in batch.schema.names:
        modes = batch.column("mode").cast(pa.string())
        unknown = pc.and_(modes.is_valid(), pc.invert(pc.is_in(modes, value_set=pa.array(MODE_NAMES))))
        if pc.any(unknown).as_py():
            shown = [
                f"id={quoted(i)} value={quoted(m)}"
                for i, m in zip(ids.filter(unknown).to_pylist()[:5], modes.filter(unknown).to_pylist()[:5])
            ]
            raise ManifestError(
                f"{file.uri}: column 'mode' has unknown modes (known: {', '.join(MODE_NAMES)}): {'; '.join(shown)}"
            )
    return ids


def check_ids(files: Sequence[ManifestFile], *, storage_options: dict[str, Any] | None = None) -> int:
    """Refuse (`ManifestError`) null/empty ids, unknown modes and repeated ids; returns the rows checked."""
    total = sum(file.num_rows for file in files)
    bits = int(np.ceil(np.log2(max(1, min(_MAX_PARTITIONS, -(-total // _ROWS_PER_PARTITION))))))
    with tempfile.TemporaryDirectory(prefix="kandinsky-ids-") as scratch:
        paths = [os.path.join(scratch, f"{p:03d}.u64") for p in range(1 << bits)]
        handles = [open(path, "wb") for path in paths]
        try:
            for file in files:
                for first_row, batch in id_batches(file, storage_options):
                    hashes = _hashes(_check_batch(file, first_row, batch))
                    if bits == 0:
                        hashes.tofile(handles[0])
                        continue
                    partition = (hashes >> np.uint64(64 - bits)).astype(np.int64)
                    order = np.argsort(partition, kind="stable")
                    bounds = np.searchsorted(partition[order], np.arange((1 << bits) + 1))
                    for p in np.flatnonzero(np.diff(bounds)):
                        hashes[order[bounds[p] : bounds[p + 1]]].tofile(handles[p])
        finally:
            for handle in handles:
                handle.close()
        suspects: list[np.ndarray] = []
        for path in paths:
            values = np.sort(np.fromfile(path, dtype=np.uint64))
            repeated = values[1:][values[1:] == values[:-1]]
            if len(repeated):
                suspects.append(np.unique(repeated))
    if suspects:
        _confirm(files, np.unique(np.concatenate(suspects)), storage_options)
    return total


def _confirm(files: Sequence[ManifestFile], suspects: np.ndarray, storage_options: dict[str, Any] | None) -> None:
    """Second pass: the real ids behind repeated hashes; raise for the first real duplicate."""
    first_file: dict[str, str] = {}
    for file in files:
        for _, batch in id_batches(file, storage_options):
            ids = batch.column("id").cast(pa.string())
            for row_id in ids.filter(pa.array(np.isin(_hashes(ids), suspects))).to_pylist():
                other = first_file.get(row_id)
                if other == file.uri:
                    raise ManifestError(f"{file.uri}: column 'id' has duplicate ids: [{quoted(row_id)}]")
                if other is not None:
                    raise ManifestError(f"column 'id': id {quoted(row_id)} appears in both {other} and {file.uri}")
                first_file[row_id] = file.uri
    logger.info("%d id hash collision(s) checked: different ids, no duplicate", len(suspects))
