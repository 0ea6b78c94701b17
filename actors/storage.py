"""Object storage through fsspec: one place that opens filesystems, lists, reads and writes atomically, with retries."""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from actors.retry import StorageFullError, no_space, retry

_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Local writes go to ``.<name>.tmp-<random>`` beside their target and are renamed over it: readers that skip
# hidden files (pyarrow datasets, so pandas.read_parquet of a folder) never see one.
TEMPORARY_MARK = ".tmp-"


class Storage:
    """A folder on any fsspec filesystem (local path, file://, s3://, gs://, memory://...).

    Keys are ``/``-separated paths relative to the folder. Writes are atomic where the filesystem
    allows it: local files are written to a hidden temporary name and renamed (a failed write removes
    its temporary file); object stores publish an object only when its upload completes. Every
    operation is retried on transient errors (`actors.retry`); each is idempotent, so a retry after an
    answer that got lost changes nothing. When retries run out, `actors.retry.StorageUnavailableError`
    names the object; a full disk (ENOSPC, EDQUOT) is `actors.retry.StorageFullError`, naming the file.
    """

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.fs, root = url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.is_local = bool(set(_protocols(self.fs)) & _LOCAL_PROTOCOLS)

    def path(self, key: str) -> str:
        """Filesystem path of ``key``."""
        return posixpath.join(self.root, key) if key else self.root

    def uri(self, key: str) -> str:
        """Full URI of ``key`` as users see it (protocol included for remote filesystems)."""
        path = self.path(key)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def write_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        """Write ``data`` at ``key`` atomically (``kwargs`` go to the filesystem's ``pipe_file``); return its URI."""
        path = self.path(key)
        if self.is_local:
            retry(lambda: _write_local(path, data), what=f"write {path}")
        else:
            retry(lambda: self.fs.pipe_file(path, data, **kwargs), what=f"write {self.uri(key)}")
        return self.uri(key)

    def put_file(self, key: str, local_path: str) -> str:
        """Publish the local file ``local_path`` at ``key`` as one whole object; return its URI.

        Locally: copied to a temporary name, synced and renamed. Object stores: one upload (a multipart
        upload of a large file becomes visible only when it completes).
        """
        path = self.path(key)
        if self.is_local:
            retry(lambda: _copy_local(local_path, path), what=f"write {path}")
        else:
            retry(lambda: self.fs.put_file(local_path, path), what=f"write {self.uri(key)}")
        return self.uri(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there; False when it already exists.

        Local files use O_EXCL; object stores a conditional put (S3 ``If-None-Match: *``, fsspec
        ``mode="create"``). Filesystems without conditional writes fall back to check-then-write.
        A retried conditional put whose first answer was lost finds its own object and returns
        False: callers read the object back to tell (`jobs.publishing.lease` does).
        """
        path = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return True

        def attempt() -> bool:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            except OSError as exc:
                if _precondition_failed(exc):  # s3fs names a 412 FileExistsError only when the store says why
                    return False
                raise
            except (TypeError, NotImplementedError):
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
            return True

        return retry(attempt, what=f"create {self.uri(key)}")

    def read_bytes(self, key: str) -> bytes:
        """Bytes of ``key``; raises FileNotFoundError when absent."""
        path = self.path(key)
        return retry(lambda: self.fs.cat_file(path), what=f"read {self.uri(key)}")

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """Bytes of each key (None for a key that is absent), fetched concurrently on object stores.

        Only a missing key reads as None: any other error is retried (the failed keys only) or raised.
        """
        paths = [self.path(key) for key in keys]
        if self.is_local:
            return [retry(lambda p=path: _read_local(p), what=f"read {path}") for path in paths]
        found: dict[str, bytes | None] = {}

        def attempt() -> None:
            todo = [_strip(self.fs, path) for path in paths if _strip(self.fs, path) not in found]
            fetched = {_strip(self.fs, p): data for p, data in self.fs.cat(todo, on_error="return").items()}
            failed = None
            for path in todo:
                data = fetched.get(path, FileNotFoundError(path))
                if isinstance(data, FileNotFoundError):
                    found[path] = None
                elif isinstance(data, BaseException):
                    failed = failed or data
                else:
                    found[path] = data
            if failed is not None:
                raise failed

        if paths:
            retry(attempt, what=f"read {len(paths)} object(s) under {self.url}")
        return [found[_strip(self.fs, path)] for path in paths]

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        path = self.path(key)
        return retry(lambda: self.fs.exists(path) if self.is_local else _exists(self.fs, path), what=f"stat {path}")

    def list_files(self, prefix: str, *, suffix: str = "") -> list[str]:
        """Sorted keys under ``prefix`` (recursive) ending with ``suffix``; [] when the prefix is absent."""
        base = self.path(prefix)

        def attempt() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                return self.fs.find(base)
            except FileNotFoundError:
                return []

        found = retry(attempt, what=f"list {self.uri(prefix)}")
        keys = [posixpath.relpath(_strip(self.fs, p), self.root) for p in found]
        return sorted(k for k in keys if k.endswith(suffix) and TEMPORARY_MARK not in k)

    def list_temporary(self, prefixes: tuple[str, ...]) -> list[str]:
        """Keys of unfinished local writes (temporary names) in the folder itself and under ``prefixes``.

        What a process killed mid-write leaves (including the visible ``<name>.tmp-*`` names of
        earlier versions); object stores have none. Only the caller knows that no write is under way.
        """
        if not self.is_local:
            return []
        found = [posixpath.join(self.root, name) for name in _local_names(self.root)]
        for prefix in prefixes:
            found += retry(lambda p=prefix: _find_local(self.fs, self.path(p)), what=f"list {self.path(prefix)}")
        keys = [posixpath.relpath(path, self.root) for path in found]
        return sorted(k for k in keys if TEMPORARY_MARK in k.rsplit("/", 1)[-1])

    def list_folders(self, prefix: str) -> list[str]:
        """Sorted names of the folders directly under ``prefix`` (one listing, not recursive); []: absent."""
        base = self.path(prefix)

        def attempt() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                entries = self.fs.ls(base, detail=True)
            except FileNotFoundError:
                return []
            return [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]

        return sorted(retry(attempt, what=f"list {self.uri(prefix)}"))

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` recursively if present."""
        base = self.path(prefix)

        def attempt() -> None:
            self.fs.invalidate_cache(base)
            try:
                if self.fs.exists(base) if self.is_local else _exists(self.fs, base):
                    self.fs.rm(base, recursive=True)
            except FileNotFoundError:
                pass  # gone already: a retry after a delete whose answer was lost

        retry(attempt, what=f"delete {self.uri(prefix)}")


def _write_local(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    _replace_local(path, write)


def _copy_local(local_path: str, path: str) -> None:
    def copy(tmp: str) -> None:
        shutil.copyfile(local_path, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())

    _replace_local(path, copy)


def _replace_local(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a hidden temporary name beside ``path``, then rename it over ``path``.

    A failed write removes its temporary file; a full disk raises `StorageFullError` naming ``path``.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}{TEMPORARY_MARK}{uuid.uuid4().hex}")
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and no_space(exc):
            raise StorageFullError(
                f"write {path}: no space left on the device ({exc.strerror or exc}); free some space (or write "
                "elsewhere) and rerun: what was published is whole and a rerun finishes the work"
            ) from exc
        raise


def _local_names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _find_local(fs: fsspec.AbstractFileSystem, base: str) -> list[str]:
    try:
        return fs.find(base)
    except FileNotFoundError:
        return []


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is an HTTP 412 answer (a conditional write that found the object there)."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            return (
                code in ("PreconditionFailed", "412")
                or (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") == 412
            )
        exc = exc.__cause__ or exc.__context__
    return False


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` exists (a file or a prefix), raising on errors that fsspec's ``exists`` would hide."""
    try:
        fs.info(path)
    except FileNotFoundError:
        return False
    return True


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path)
