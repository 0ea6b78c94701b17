"""Manifest files: list them, read their Parquet footers (rows, row groups, schema, fingerprint), cut shards, read one.

Nothing here reads more than one shard's rows at a time: listing and cutting use only footers. Every
read is retried on transient storage errors (`actors.retry`); only what is left once retries are
spent, and is not a storage outage, is a `ManifestError`.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import os
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actors.retry import StorageUnavailableError, retry
from actors.storage import open_fs
from schemas.loggers import logger_for
from schemas.manifest import ManifestError, check_schema, normalize
from schemas.shards import Fingerprint, Shard
from schemas.text import file_kind, public_uri

logger = logger_for(__name__)


@dataclass(frozen=True, kw_only=True)
class ManifestFile:
    """One manifest file as its footer describes it."""

    uri: str
    relpath: str  # relative to the manifest root: what shard names are made of
    fingerprint: Fingerprint
    num_rows: int
    row_group_rows: tuple[int, ...]
    schema: pa.Schema


def _protocols(fs: Any) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _is_local(fs: Any) -> bool:
    return bool(_protocols(fs) & {"file", "local"})


def manifest_location(uri: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """``uri`` in the form an output pins it: absolute (a local path no longer depends on the working
    directory), with the store's protocol, without a trailing ``/``. It names the same files as ``uri``."""
    fs, path = open_fs(uri, storage_options)
    path = path.rstrip("/") or path
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def list_manifest_paths(
    uri: str, *, storage_options: dict[str, Any] | None = None, exclude: str | None = None
) -> list[tuple[str, str]]:
    """(full URI, path relative to the manifest root) of each Parquet file ``uri`` names, sorted.

    ``uri`` is one file (root: its folder), a folder or prefix (recursive; names starting with ``_``
    or ``.`` are skipped, as Spark/Hive markers), or a glob (root: the folder before the first
    wildcard). Files under ``exclude`` (the job's output prefix, however either is spelled: relative
    or absolute, ``file://`` or a plain path, a symlink, a trailing slash, ``s3://`` or ``s3a://``) are
    left out: a job never reads its own results as manifest. Raises `ManifestError` when nothing is
    found, or when ``uri`` itself lies inside ``exclude``.
    """
    fs, path = open_fs(uri, storage_options)
    path = path.rstrip("/") or path
    inside = _under(exclude, fs=fs, storage_options=storage_options) if exclude else None
    if inside is not None and inside(_literal_prefix(path)):
        raise ManifestError(
            f"{uri}: the manifest lies inside the output {exclude}, where the job writes Parquet files of its own "
            "(results/, data/) that must never be read as manifest; keep manifests outside the output prefix"
        )
    root, found = retry(lambda: _find_files(fs, path, uri), what=f"list {uri}")
    if inside is not None:
        kept = [p for p in found if not inside(p)]
        if len(kept) < len(found):
            logger.info("%s: leaving out %d file(s) under the output %s", uri, len(found) - len(kept), exclude)
        found = kept
    if not found:
        raise ManifestError(f"{uri}: no Parquet files found")
    local = _is_local(fs)
    return sorted((p if local else fs.unstrip_protocol(p), _relpath(p, root)) for p in found)


def _relpath(path: str, root: str) -> str:
    """A manifest file's path under its root, as shard names use it: for a URL without its query or fragment (a
    presigned URL's signature must not name folders in the output)."""
    if "://" in path:
        path, root = public_uri(path), public_uri(root) if root else root
    return posixpath.relpath(path, root) if root else path


def _literal_prefix(path: str) -> str:
    """``path`` up to its first wildcard (a glob's root), or ``path`` itself."""
    if not globlib.has_magic(path):
        return path
    parts = path.split("/")
    return "/".join(parts[: next(i for i, part in enumerate(parts) if globlib.has_magic(part))])


def _under(prefix: str, *, fs: Any, storage_options: dict[str, Any] | None) -> Callable[[str], bool] | None:
    """A test of whether a path of ``fs`` lies at or under ``prefix`` (None when ``prefix`` is on another store).

    Local paths are compared resolved (absolute, symlinks followed); object store paths as fsspec
    strips them (``bucket/key``, no protocol, no trailing slash).
    """
    prefix_fs, prefix_path = open_fs(prefix, storage_options)
    if not _protocols(prefix_fs) & _protocols(fs):
        return None
    if _is_local(fs):

        def normal(path: str) -> str:
            return os.path.realpath(os.path.abspath(path))

    else:

        def normal(path: str) -> str:
            return fs._strip_protocol(path).rstrip("/")

    top = normal(prefix_path)
    return lambda path: (found := normal(path)) == top or found.startswith(top.rstrip("/") + "/")


def inside_test(prefix: str, *, storage_options: dict[str, Any] | None = None) -> Callable[[str], bool]:
    """A test of whether a URI (or plain path) lies at or under ``prefix``, however either is spelled: built once,
    then cheap per URI (no request; a local path is resolved once per call)."""
    fs, _ = open_fs(prefix, storage_options)
    under = _under(prefix, fs=fs, storage_options=storage_options)
    protocols = _protocols(fs) | ({"file", "local", ""} if _is_local(fs) else set())

    def inside(uri: str) -> bool:
        protocol = uri.partition("://")[0].split("::")[0].lower() if "://" in uri else ""
        return under is not None and protocol in protocols and under(fs._strip_protocol(uri))

    return inside


def overlap(first: str, second: str, *, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether two locations (any fsspec URIs or paths, however spelled) are the same or one lies inside the other."""
    for a, b in ((first, second), (second, first)):
        fs, path = open_fs(a, storage_options)
        inside = _under(b, fs=fs, storage_options=storage_options)
        if inside is not None and inside(path.rstrip("/") or path):
            return True
    return False


def _find_files(fs: Any, path: str, uri: str) -> tuple[str, list[str]]:
    """(root, Parquet files) of a manifest ``path``: errors other than absence propagate (they may be retried).

    A local manifest file that is not a regular file (a FIFO, a device: reading one blocks or never ends) is
    refused here, with the path and what it is, rather than skipped: it was named or put there as a manifest.
    """
    if globlib.has_magic(path):
        matches = fs.glob(path, detail=True)
        found = [p for p, info in matches.items() if _listed(fs, info.get("type"))]
        return _literal_prefix(path), [_regular(fs, p) for p in found]
    try:
        kind = fs.info(path).get("type")
    except FileNotFoundError:
        kind = None
    if kind == "directory":
        found = [
            p
            for p in fs.find(path)
            if p.endswith(".parquet") and not any(part[:1] in "._" for part in p[len(path) :].split("/") if part)
        ]
        return path, [_regular(fs, p) for p in found]
    if _listed(fs, kind):
        return posixpath.dirname(path), [_regular(fs, path)]
    raise ManifestError(f"{uri}: no such manifest file, folder or prefix")


def _listed(fs: Any, kind: str | None) -> bool:
    """Whether an entry of fsspec type ``kind`` is taken as a manifest file: a file, or locally anything but a folder
    (``other``: a FIFO, a device, a socket, which `_regular` then refuses by name)."""
    return kind == "file" or (kind not in ("directory", None) and _is_local(fs))


def _regular(fs: Any, path: str) -> str:
    """``path`` when it is not local or is a regular file (symlinks followed); else a `ManifestError` naming it and
    what it is. Checked before every local open: ``open`` of a FIFO waits for a writer that never comes."""
    if _is_local(fs):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            return path  # gone since it was listed: the read says so
        if not stat.S_ISREG(mode):
            raise ManifestError(f"{path}: is {file_kind(mode)}, not a regular file; a manifest file is a Parquet file")
    return path


def _reading(what: str, operation: Any, error: str) -> Any:
    """``operation()`` retried on transient errors; any other failure is a `ManifestError` starting with ``error``."""
    try:
        return retry(operation, what=what)
    except (StorageUnavailableError, ManifestError):
        raise
    except Exception as exc:
        raise ManifestError(f"{error}: {type(exc).__name__}: {exc}") from exc


def read_footer(uri: str, relpath: str, *, storage_options: dict[str, Any] | None = None) -> ManifestFile:
    """The footer of one manifest file; `ManifestError` for a file that is not Parquet or has a bad schema."""
    fs, path = open_fs(uri, storage_options)

    def read() -> tuple[dict[str, Any], Any, pa.Schema, str]:
        info = fs.info(path)
        with fs.open(_regular(fs, path), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            return info, parquet.metadata, parquet.schema_arrow, _footer_digest(handle, int(info.get("size") or 0))

    info, metadata, schema, footer = _reading(f"read {uri}", read, f"{uri}: cannot read as Parquet")
    check_schema(schema, file=uri)
    return ManifestFile(
        uri=uri,
        relpath=relpath,
        fingerprint=Fingerprint.from_info(info, footer=footer),
        num_rows=metadata.num_rows,
        row_group_rows=tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)),
        schema=schema,
    )


def with_content_digest(file: ManifestFile, *, known: Fingerprint | None) -> ManifestFile:
    """``file`` with the sha256 of its bytes in its fingerprint when it is local (object stores give an etag).

    The digest an output recorded for the file is reused while its size and mtime are unchanged; otherwise the
    file is read whole once (a new file, or a ``touch``: an edit that keeps size and footer shows here).
    """
    fs, path = open_fs(file.uri)
    if not _is_local(fs):
        return file
    fingerprint = file.fingerprint
    if known is not None and known.content and (known.size, known.mtime) == (fingerprint.size, fingerprint.mtime):
        content = known.content
    else:

        def read() -> str:
            digest = hashlib.sha256()
            with open(_regular(fs, path), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            return digest.hexdigest()

        content = _reading(f"read {file.uri}", read, f"{file.uri}: cannot read")
    return dataclasses.replace(file, fingerprint=dataclasses.replace(fingerprint, content=content))


def _footer_digest(handle: Any, size: int) -> str:
    """sha256 of a Parquet file's footer (its last ``8 + footer length`` bytes)."""
    handle.seek(size - 8)
    tail = handle.read(8)
    length = int.from_bytes(tail[:4], "little")
    handle.seek(size - 8 - length)
    return hashlib.sha256(handle.read(length) + tail).hexdigest()[:32]


def cut_shards(file: ManifestFile, *, shard_rows: int) -> list[Shard]:
    """The file's shards: consecutive whole row groups of at most ``shard_rows`` rows together; a larger
    row group is cut into ranges of ``shard_rows``. A pure function of the footer and ``shard_rows``."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    ranges: list[tuple[int, int, list[int]]] = []  # (start, stop, row groups) of each shard
    pending: list[int] = []  # whole row groups accumulating into the next shard
    pending_start = start = 0

    def flush() -> None:
        if pending:
            ranges.append((pending_start, pending_start + sum(file.row_group_rows[g] for g in pending), list(pending)))
            pending.clear()

    for index, rows in enumerate(file.row_group_rows):
        if rows > shard_rows:
            flush()
            end = start + rows
            ranges.extend((s, min(s + shard_rows, end), [index]) for s in range(start, end, shard_rows))
        elif rows:
            if sum(file.row_group_rows[g] for g in pending) + rows > shard_rows:
                flush()
            if not pending:
                pending_start = start
            pending.append(index)
        start += rows
    flush()
    return [
        Shard(
            file=file.uri,
            relpath=file.relpath,
            start=s,
            stop=e,
            fingerprint=file.fingerprint,
            row_groups=tuple(groups),
        )
        for s, e, groups in ranges
    ]


def read_whole(file: ManifestFile, *, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Every row of a (small) manifest file, normalized; for in-memory plans (`jobs.planning.plan.manifest_work`)."""
    fs, path = open_fs(file.uri, storage_options)
    table = _reading(
        f"read {file.uri}",
        lambda: pq.read_table(_regular(fs, path), filesystem=fs),
        f"{file.uri}: cannot read as Parquet",
    )
    return normalize(table, file=file.uri)


class ShardReader:
    """Reads the rows of shards, in order, with one open file and its last row groups kept.

    Consecutive shards cut from one large row group cost one read of it (memory: that row group), and
    a file's footer is parsed once, not once per shard. Use it as a context manager.
    """

    def __init__(self, *, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = storage_options or {}
        self._file: str | None = None
        self._handle: Any = None
        self._parquet: pq.ParquetFile | None = None
        self._offsets: list[int] = []
        self._cached: tuple[tuple[int, ...], tuple[str, ...] | None, pa.Table] | None = None

    def _open(self, file: str) -> pq.ParquetFile:
        if file != self._file:
            self.close()
            fs, path = open_fs(file, self.storage_options)
            self._handle = fs.open(_regular(fs, path), "rb")
            self._parquet = pq.ParquetFile(self._handle)
            rows = [self._parquet.metadata.row_group(i).num_rows for i in range(self._parquet.num_row_groups)]
            self._offsets = [sum(rows[:i]) for i in range(len(rows))]
            self._file = file
        return self._parquet

    def raw(self, shard: Shard, columns: list[str] | None = None) -> pa.Table:
        """The shard's rows as stored (only ``columns`` that exist, when given); retried on transient errors."""

        def read() -> pa.Table:
            try:
                return self._read(shard, columns)
            except Exception:
                self.close()  # a failed read leaves the handle in an unknown state: the retry reopens the file
                raise

        where = f"{shard.file}: cannot read rows {shard.start}..{shard.stop}"
        return _reading(f"read rows {shard.start}..{shard.stop} of {shard.file}", read, where)

    def _read(self, shard: Shard, columns: list[str] | None) -> pa.Table:
        parquet = self._open(shard.file)
        if columns is not None:
            columns = [name for name in columns if name in parquet.schema_arrow.names]
        key = (shard.row_groups, None if columns is None else tuple(columns))
        if self._cached is None or self._cached[:2] != key:
            self._cached = (*key, parquet.read_row_groups(list(shard.row_groups), columns=columns))
        first_row = self._offsets[shard.row_groups[0]]
        return self._cached[2].slice(shard.start - first_row, shard.num_rows)

    def read(self, shard: Shard) -> pa.Table:
        """The shard's rows, normalized (`schemas.manifest.normalize`)."""
        return normalize(self.raw(shard), file=shard.file)

    def columns(self, shard: Shard, names: list[str]) -> tuple[pa.Table, bool]:
        """Columns ``names`` of the shard's rows (null where absent) and whether its ``hint`` may be null.

        The second answer comes from the row groups' statistics (null counts), without reading hints.
        """
        table = self.raw(shard, names)
        metadata = self._parquet.metadata
        hints_null = True
        # Row groups index leaf columns: a nested column before ``hint`` shifts its position from the schema's.
        leaves = [i for i in range(metadata.num_columns) if metadata.schema.column(i).path == "hint"]
        if leaves:
            stats = [metadata.row_group(g).column(leaves[0]).statistics for g in shard.row_groups]
            hints_null = any(s is None or not s.has_null_count or s.null_count > 0 for s in stats)
        for name in names:
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows))
        return table, hints_null

    def close(self) -> None:
        """Close the open file."""
        if self._handle is not None:
            self._handle.close()
        self._file = self._handle = self._parquet = self._cached = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
