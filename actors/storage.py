"""Object storage through fsspec: one place that opens filesystems, lists, reads and writes atomically."""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

_LOCAL_PROTOCOLS = frozenset({"file", "local"})


class Storage:
    """A folder on any fsspec filesystem (local path, file://, s3://, gs://, memory://...).

    Keys are ``/``-separated paths relative to the folder. Writes are atomic where the filesystem
    allows it: local files are written to a temporary name and renamed; object stores publish an
    object only when its upload completes.
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

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically; return its URI."""
        path = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return self.uri(key)

    def put_file(self, key: str, local_path: str) -> str:
        """Publish the local file ``local_path`` at ``key`` as one whole object; return its URI.

        Locally: copied to a temporary name, synced and renamed. Object stores: one upload (a multipart
        upload of a large file becomes visible only when it completes).
        """
        path = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            shutil.copyfile(local_path, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            self.fs.put_file(local_path, path)
        return self.uri(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` only if nothing is there; False when it already exists.

        Local files use O_EXCL; object stores a conditional put (S3 ``If-None-Match: *``, fsspec
        ``mode="create"``). Filesystems without conditional writes fall back to check-then-write.
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
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
        return True

    def read_bytes(self, key: str) -> bytes:
        """Bytes of ``key``; raises FileNotFoundError when absent."""
        return self.fs.cat_file(self.path(key))

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """Bytes of each key (None for a key that is absent), fetched concurrently on object stores."""
        paths = [self.path(key) for key in keys]
        if self.is_local:
            found = []
            for path in paths:
                try:
                    with open(path, "rb") as handle:
                        found.append(handle.read())
                except FileNotFoundError:
                    found.append(None)
            return found
        fetched = self.fs.cat(paths, on_error="omit") if paths else {}
        by_path = {_strip(self.fs, path): data for path, data in fetched.items()}
        return [by_path.get(_strip(self.fs, path)) for path in paths]

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        return self.fs.exists(self.path(key))

    def list_files(self, prefix: str, *, suffix: str = "") -> list[str]:
        """Sorted keys under ``prefix`` (recursive) ending with ``suffix``; [] when the prefix is absent."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        self.fs.invalidate_cache(base)
        found = self.fs.find(base)
        keys = [posixpath.relpath(_strip(self.fs, p), self.root) for p in found]
        return sorted(k for k in keys if k.endswith(suffix) and ".tmp-" not in k)

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` recursively if present."""
        base = self.path(prefix)
        self.fs.invalidate_cache(base)
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path)
