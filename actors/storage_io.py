"""The plain functions under `actors.storage.Storage`: atomic local writes, reads that refuse what is not a
regular file or is larger than expected, capped remote reads, and the object-store answers it tells apart."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from typing import Any

import fsspec

from actors.retry import StorageFullError, no_space
from schemas.text import file_kind

# Local writes go to ``.<name>.tmp-<random>`` beside their target and are renamed over it: readers that skip
# hidden files (pyarrow datasets, so pandas.read_parquet of a folder) never see one.
TEMPORARY_MARK = ".tmp-"


class UnsafeObjectError(ValueError):
    """An object the job refuses to touch: a key that leads outside the folder (absolute, ``..``, or through a
    symlink), something other than a regular file, or a file above its size cap. The message names it."""


def write_local(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    replace_local(path, write)


def copy_local(local_path: str, path: str) -> None:
    def copy(tmp: str) -> None:
        shutil.copyfile(local_path, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())

    replace_local(path, copy)


def replace_local(path: str, write: Callable[[str], None]) -> None:
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


def local_names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def find_local(fs: fsspec.AbstractFileSystem, base: str) -> list[str]:
    try:
        return fs.find(base)
    except FileNotFoundError:
        return []


def read_local(path: str, max_bytes: int) -> bytes | None:
    """A regular file's bytes (None when absent). Opened without blocking, so a FIFO is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise UnsafeObjectError(f"{path} is a folder, not a file: refused") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeObjectError(f"{path}: is {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise UnsafeObjectError(f"{path} holds {info.st_size} bytes, more than the {max_bytes} expected: refused")
        os.set_blocking(fd, True)
        data = handle.read(max_bytes + 1)
    return capped(data, max_bytes, path)


def capped(data: bytes, max_bytes: int, where: str) -> bytes:
    if len(data) > max_bytes:
        raise UnsafeObjectError(f"{where} holds more than the {max_bytes} bytes expected: refused")
    return data


def read_remote(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of an object, in one ranged request (no size lookup first)."""
    try:
        return fs.cat_file(path, start=0, end=max_bytes + 1)
    except OSError as exc:
        if not range_refused(exc):
            raise
    return fs.cat_file(path)  # an empty object answers a range with 416: read it whole


def cat_capped(fs: fsspec.AbstractFileSystem, paths: list[str], max_bytes: int) -> dict[str, Any]:
    """`read_remote` of each path, concurrently: path -> bytes, or the exception its read raised."""
    if not paths:
        return {}
    try:
        fetched = fs.cat_ranges(paths, [0] * len(paths), [max_bytes + 1] * len(paths), on_error="return")
    except (NotImplementedError, TypeError):
        fetched = [fs.cat_file(path) for path in paths]
    found = dict(zip(paths, fetched))
    for path, data in found.items():
        if isinstance(data, OSError) and range_refused(data):
            found[path] = fs.cat_file(path)
    return found


def answered(exc: BaseException | None, codes: tuple[str, ...], status: int) -> bool:
    """Whether ``exc`` (or what caused it) is an object store's answer with one of ``codes`` or HTTP ``status``."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            return code in codes or (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") == status
        exc = exc.__cause__ or exc.__context__
    return False


def range_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is an HTTP 416 answer (a range request on an empty object)."""
    return answered(exc, ("InvalidRange", "416"), 416) or "InvalidRange" in str(exc)


def precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is an HTTP 412 answer (a conditional write that found the object there)."""
    return answered(exc, ("PreconditionFailed", "412"), 412)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` exists (a file or a prefix), raising on errors that fsspec's ``exists`` would hide."""
    try:
        fs.info(path)
    except FileNotFoundError:
        return False
    return True


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def strip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs._strip_protocol(path)
