"""Object storage through fsspec: one place that opens filesystems, lists, reads and writes atomically, with retries."""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Iterable
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from actors.retry import retry
from actors.storage_io import (
    TEMPORARY_MARK,
    UnsafeObjectError,
    capped,
    cat_capped,
    copy_local,
    exists,
    find_local,
    local_names,
    precondition_failed,
    protocols,
    read_local,
    read_remote,
    strip,
    write_local,
)

_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Filesystems that take no storage options: they hold no credentials, and options meant for an object store
# (s3fs's client_kwargs) would break them (aiohttp refuses an endpoint_url).
_PLAIN_PROTOCOLS = _LOCAL_PROTOCOLS | {"", "http", "https", "memory"}
# The most bytes read of an object of the output unless the caller says: results Parquet files with previews.
MAX_READ_BYTES = 1 << 30


def options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage options that apply to ``uri``: none for local paths, http(s) URLs and memory://, else all."""
    protocol = uri.partition("://")[0].lower() if "://" in uri else ""
    return {} if protocol in _PLAIN_PROTOCOLS or not storage_options else dict(storage_options)


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with the options that apply to ``uri`` (`options_for`)."""
    return url_to_fs(uri, **options_for(uri, storage_options))


def check_key(key: str, *, where: str) -> str:
    """``key`` when it names something inside a folder (relative, no ``.``/``..``/empty segments, no NUL);
    else `UnsafeObjectError` naming ``where``. A trailing ``/`` is allowed."""
    parts = key.rstrip("/").split("/")
    if key and (key.startswith("/") or "\x00" in key or any(part in ("", ".", "..") for part in parts)):
        raise UnsafeObjectError(f"{key!r} does not name an object inside {where}: refused")
    return key


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
        self.fs, root = open_fs(self.url, storage_options)
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.is_local = bool(set(protocols(self.fs)) & _LOCAL_PROTOCOLS)
        self._real_root: str | None = None

    def path(self, key: str) -> str:
        """Filesystem path of ``key``; `UnsafeObjectError` when ``key`` leads outside the folder (an absolute key,
        ``..``; locally also a symlink on the way that resolves outside it)."""
        check_key(key, where=self.url)
        path = posixpath.join(self.root, key) if key else self.root
        if self.is_local and key:
            if self._real_root is None:
                self._real_root = os.path.realpath(self.root)
            real = os.path.realpath(path)
            if real != self._real_root and not real.startswith(self._real_root.rstrip("/") + "/"):
                raise UnsafeObjectError(
                    f"{path} leads outside the folder {self.root} (to {real}, through a symbolic link): refused"
                )
        return path

    def uri(self, key: str) -> str:
        """Full URI of ``key`` as users see it (protocol included for remote filesystems)."""
        path = self.path(key)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def write_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        """Write ``data`` at ``key`` atomically (``kwargs`` go to the filesystem's ``pipe_file``); return its URI."""
        path = self.path(key)
        if self.is_local:
            retry(lambda: write_local(path, data), what=f"write {path}")
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
            retry(lambda: copy_local(local_path, path), what=f"write {path}")
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
                if precondition_failed(exc):  # s3fs names a 412 FileExistsError only when the store says why
                    return False
                raise
            except (TypeError, NotImplementedError):
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
            return True

        return retry(attempt, what=f"create {self.uri(key)}")

    def read_bytes(self, key: str, *, max_bytes: int = MAX_READ_BYTES) -> bytes:
        """Bytes of ``key``; FileNotFoundError when absent, `UnsafeObjectError` when it is not a regular file
        (locally: a FIFO, a device, a folder) or holds more than ``max_bytes``."""
        path = self.path(key)
        if self.is_local:
            data = retry(lambda: read_local(path, max_bytes), what=f"read {path}")
            if data is None:
                raise FileNotFoundError(path)
            return data
        data = retry(lambda: read_remote(self.fs, path, max_bytes), what=f"read {self.uri(key)}")
        return capped(data, max_bytes, self.uri(key))

    def read_many(self, keys: list[str], *, max_bytes: int = MAX_READ_BYTES) -> list[bytes | None | UnsafeObjectError]:
        """Bytes of each key, fetched concurrently on object stores: None for a key that is absent, an
        `UnsafeObjectError` (returned, not raised) for one that is not a regular file or is too large.

        Any other error is retried (the failed keys only) or raised.
        """
        if self.is_local:
            return [self._read_one_local(key, max_bytes) for key in keys]
        paths = [self.path(key) for key in keys]
        found: dict[str, bytes | None] = {}

        def attempt() -> None:
            todo = [strip(self.fs, path) for path in paths if strip(self.fs, path) not in found]
            fetched = cat_capped(self.fs, todo, max_bytes)
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
        results: list[bytes | None | UnsafeObjectError] = []
        for key, path in zip(keys, paths):
            data = found[strip(self.fs, path)]
            try:
                results.append(None if data is None else capped(data, max_bytes, self.uri(key)))
            except UnsafeObjectError as exc:
                results.append(exc)
        return results

    def _read_one_local(self, key: str, max_bytes: int) -> bytes | None | UnsafeObjectError:
        try:
            path = self.path(key)
            return retry(lambda: read_local(path, max_bytes), what=f"read {path}")
        except UnsafeObjectError as exc:
            return exc

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        path = self.path(key)
        return retry(lambda: self.fs.exists(path) if self.is_local else exists(self.fs, path), what=f"stat {path}")

    def check_links(self, prefixes: Iterable[str]) -> None:
        """Local folders: `UnsafeObjectError` naming the first symbolic link under ``prefixes`` (a file or a folder)
        that resolves outside the folder, found before anything is deleted: a delete through it would reach files
        that are not the output's. Object stores have no links."""
        if not self.is_local:
            return
        for prefix in prefixes:
            for top, dirs, files in os.walk(self.path(prefix)):  # a linked folder is seen, not entered
                for name in (*dirs, *files):
                    if os.path.islink(os.path.join(top, name)):
                        self.path(posixpath.relpath(os.path.join(top, name), self.root))  # raises when outside

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
        keys = [posixpath.relpath(strip(self.fs, p), self.root) for p in found]
        return sorted(k for k in keys if k.endswith(suffix) and TEMPORARY_MARK not in k)

    def list_sizes(self, prefix: str) -> dict[str, int]:
        """Key -> size of every file under ``prefix`` (recursive; one listing, no temporary files); {} when absent."""
        base = self.path(prefix)

        def attempt() -> dict[str, Any]:
            self.fs.invalidate_cache(base)
            try:
                return self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}

        found = retry(attempt, what=f"list {self.uri(prefix)}")
        sizes = {}
        for path, info in found.items():
            key = posixpath.relpath(strip(self.fs, path), self.root)
            if TEMPORARY_MARK not in key and info.get("type", "file") == "file":
                sizes[key] = int(info.get("size") or 0)
        return sizes

    def list_temporary(self, prefixes: tuple[str, ...]) -> list[str]:
        """Keys of unfinished local writes (temporary names) in the folder itself and under ``prefixes``.

        What a process killed mid-write leaves (including the visible ``<name>.tmp-*`` names of
        earlier versions); object stores have none. Only the caller knows that no write is under way.
        """
        if not self.is_local:
            return []
        found = [posixpath.join(self.root, name) for name in local_names(self.root)]
        for prefix in prefixes:
            found += retry(lambda p=prefix: find_local(self.fs, self.path(p)), what=f"list {self.path(prefix)}")
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

    def list_level(self, prefix: str) -> tuple[list[str], list[str]]:
        """(sorted folder names, sorted file keys) directly under ``prefix``: one listing, not recursive (object
        stores: one request per thousand entries, folders as common prefixes); ([], []) when it is absent."""
        base = self.path(prefix)

        def attempt() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(base)
            try:
                return self.fs.ls(base, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return []

        folders, files = [], []
        for entry in retry(attempt, what=f"list {self.uri(prefix)}"):
            name = posixpath.basename(strip(self.fs, entry["name"]).rstrip("/"))
            if not name or TEMPORARY_MARK in name:
                continue
            if entry.get("type") == "directory":
                folders.append(name)
            else:
                files.append(f"{prefix.rstrip('/')}/{name}" if prefix.strip("/") else name)
        return sorted(folders), sorted(files)

    def open_input(self, key: str, *, size: int) -> IO[bytes]:
        """``key`` opened for streamed reading (object stores fetch it in blocks as it is read); `UnsafeObjectError`
        when it is not a regular file of exactly ``size`` bytes, FileNotFoundError when it is absent."""
        path = self.path(key)

        def attempt() -> IO[bytes]:
            if self.is_local:
                handle = open(path, "rb")  # noqa: SIM115 - the caller closes it
                info = os.fstat(handle.fileno())
                found = info.st_size if stat.S_ISREG(info.st_mode) else None
            else:
                self.fs.invalidate_cache(path)
                handle = self.fs.open(path, "rb")
                found = handle.size
            if found != size:
                handle.close()
                raise UnsafeObjectError(f"{self.uri(key)} holds {found} bytes, not the {size} expected: refused")
            return handle

        return retry(attempt, what=f"open {self.uri(key)}")

    def list_top(self) -> list[str]:
        """Sorted names directly in the folder (files and folders, one listing); [] when it is absent or empty."""
        base = self.path("")

        def attempt() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                entries = self.fs.ls(base, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return []
            names = [posixpath.basename(strip(self.fs, e["name"]).rstrip("/")) for e in entries]
            return [name for name in names if name and strip(self.fs, base).rstrip("/") != name]

        return sorted(retry(attempt, what=f"list {self.url}"))

    def delete_keys(self, keys: list[str]) -> None:
        """Remove these files (one batched request per thousand keys on object stores); absent ones are skipped."""
        paths = [self.path(key) for key in keys]
        if self.is_local:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    retry(lambda p=path: os.remove(p), what=f"delete {path}")
            return
        for start in range(0, len(paths), 1000):
            chunk = paths[start : start + 1000]

            def attempt(chunk: list[str] = chunk) -> None:
                try:
                    self.fs.rm(chunk)
                except FileNotFoundError:
                    pass

            retry(attempt, what=f"delete {len(chunk)} object(s) under {self.url}")

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` recursively if present."""
        base = self.path(prefix)

        def attempt() -> None:
            self.fs.invalidate_cache(base)
            try:
                if self.fs.exists(base) if self.is_local else exists(self.fs, base):
                    self.fs.rm(base, recursive=True)
            except FileNotFoundError:
                pass  # gone already: a retry after a delete whose answer was lost

        retry(attempt, what=f"delete {self.uri(prefix)}")
