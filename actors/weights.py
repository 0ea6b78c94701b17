"""Checkpoints on object storage: copied once per node into a local cache, under a lock, before a stage loads them.

`local_checkpoint` gives the path a stage passes to ``from_pretrained``. A local folder and a hub id
stay as they are (the hub keeps its downloads in its own cache, ``$HF_HOME``, with its own file
locks). An fsspec URI (``s3://``, ``gs://``, ``az://``, ``hf://``, ...) is synced into
``$KANDINSKY_RENDER_CACHE/models/<name>-<h16>/``: the first actor on a node to ask takes a lock
file there and downloads every file of the checkpoint into a temporary folder that it renames into
place when whole; the actors that asked meanwhile wait on the lock and then find the copy. Each
later start lists the checkpoint again (one LIST request) and downloads again only when the
listing (names, sizes, ETags or modification times) differs from the one recorded with the copy,
so a checkpoint replaced on storage is picked up and an unchanged one costs nothing. A copy cut
short by a crash or a full disk is never used: it stays under a temporary name, removed by the
next sync. When the store cannot be listed but a whole copy exists, the copy is used (with a warning).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.retry import is_transient, retry
from schemas.logs import logger_for
from schemas.models import CACHE_ENV, cache_root, is_remote, local_path

logger = logger_for(__name__)

SYNC_RECORD = ".kandinsky-render-sync.json"  # in a whole copy: the listing it was made from
LOCK_LOG_S = 30.0  # how often a process waiting for another's download says so


@dataclass(frozen=True, kw_only=True)
class Synced:
    """Where a checkpoint's copy is on this node and what the sync did."""

    path: str
    downloaded: bool  # False: the copy on this node was up to date (or the store was unreachable)
    num_files: int
    num_bytes: int
    seconds: float


def local_checkpoint(path: str, *, storage_options: dict[str, Any] | None = None, cache: str | None = None) -> str:
    """What to give ``from_pretrained`` for the checkpoint at ``path``: a local folder or hub id as it is, an
    fsspec URI as this node's synced copy in ``cache`` (default `models_cache`; see `sync_checkpoint`)."""
    if not is_remote(path):
        return local_path(path)
    return sync_checkpoint(path, storage_options=storage_options, cache=cache).path


def models_cache() -> str:
    """Where synced checkpoints live on this node: ``$KANDINSKY_RENDER_CACHE/models``."""
    return os.path.join(cache_root(), "models")


def sync_checkpoint(uri: str, *, storage_options: dict[str, Any] | None = None, cache: str | None = None) -> Synced:
    """This node's whole, up-to-date copy of the checkpoint folder at ``uri``, downloaded if needed (see module).

    Raises FileNotFoundError when ``uri`` holds no file, `actors.retry.StorageUnavailableError` when the
    store keeps failing and no copy exists, OSError (ENOSPC) when the cache's disk cannot hold it, and
    ValueError for an object name that would leave the copy's folder.
    """
    started = time.monotonic()
    root = Path(cache or models_cache())
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(uri)
    target = root / key
    with _locked(root / f"{key}.lock", what=uri):
        for leftover in [*root.glob(f"{key}.tmp-*"), *root.glob(f"{key}.old-*")]:  # a sync that died (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        recorded = _recorded(target)
        try:
            listing = _listing(uri, storage_options or {})
        except Exception as exc:
            if recorded is None or not is_transient(exc):
                raise
            logger.warning("cannot list %s (%s); using the copy synced earlier at %s", uri, exc, target)
            return _synced(target, recorded, downloaded=False, started=started)
        if recorded != listing:
            _download(uri, listing, root=root, key=key, storage_options=storage_options or {}, recorded=recorded)
            synced = _synced(target, listing, downloaded=True, started=started)
            logger.info(
                "synced %s into %s: %d file(s), %s in %.1f s",
                uri,
                target,
                synced.num_files,
                _size(synced.num_bytes),
                synced.seconds,
            )
            return synced
    return _synced(target, listing, downloaded=False, started=started)


def cache_key(uri: str) -> str:
    """The copy's folder name: the URI's last part, readable, and 16 hex digits of its sha256 (distinct per URI)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", posixpath.basename(uri.rstrip("/")))[:48] or "checkpoint"
    return f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def _synced(target: Path, listing: dict[str, dict[str, Any]], *, downloaded: bool, started: float) -> Synced:
    return Synced(
        path=str(target),
        downloaded=downloaded,
        num_files=len(listing),
        num_bytes=sum(int(entry["size"]) for entry in listing.values()),
        seconds=time.monotonic() - started,
    )


@contextlib.contextmanager
def _locked(lock: Path, *, what: str) -> Iterator[None]:
    """An exclusive lock on this node (``flock``: released when the holder exits, even killed)."""
    with open(lock, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait_for(handle, what=what)
        except OSError as exc:  # a file system without locks (some FUSE mounts): copies are renamed whole anyway
            logger.warning("no lock on %s (%s): syncing %s unlocked; a second download may happen", lock, exc, what)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(handle: Any, *, what: str) -> None:
    """Block until the lock of ``handle`` is ours, saying every `LOCK_LOG_S` that another process holds it."""
    waited = time.monotonic()
    logger.info("waiting for another process on this node that is syncing %s", what)
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.2)
            if time.monotonic() - waited > LOCK_LOG_S:
                waited = time.monotonic()
                logger.info("still waiting for the sync of %s by another process on this node", what)


def _listing(uri: str, storage_options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Relative path -> size and version (ETag, else modification time) of every file under ``uri``."""
    from actors.storage import open_fs

    fs, root = open_fs(uri, storage_options)
    root = root.rstrip("/")
    found = retry(lambda: fs.find(root, detail=True, withdirs=False), what=f"list {uri}")
    listing = {}
    for path, info in found.items():
        relative = posixpath.relpath(path, root)
        parts = relative.split("/")
        if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{uri}: object {path!r} would land outside the checkpoint's folder")
        version = next((info[k] for k in ("ETag", "etag", "LastModified", "mtime", "created") if info.get(k)), "")
        listing[relative] = {"size": int(info.get("size") or 0), "version": str(version)}
    if not listing:
        raise FileNotFoundError(f"{uri}: no files there")
    return dict(sorted(listing.items()))


def _recorded(target: Path) -> dict[str, dict[str, Any]] | None:
    """The listing a whole copy was made from; None when there is no whole copy."""
    try:
        return json.loads((target / SYNC_RECORD).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _download(
    uri: str,
    listing: dict[str, dict[str, Any]],
    *,
    root: Path,
    key: str,
    storage_options: dict,
    recorded: dict[str, dict[str, Any]] | None,
) -> None:
    """Every file of ``listing`` into a temporary folder, checked against its listed size, then renamed to ``key``.

    Files the previous copy holds unchanged (``recorded``) are linked from it, not downloaded again.
    """
    from actors.storage import open_fs

    fs, base = open_fs(uri, storage_options)
    kept = {relative for relative, entry in listing.items() if recorded and recorded.get(relative) == entry}
    need = sum(int(entry["size"]) for relative, entry in listing.items() if relative not in kept)
    free = shutil.disk_usage(root).free
    if need > free:
        raise OSError(
            errno.ENOSPC,
            f"syncing {uri} needs {_size(need)} but {root} has {_size(free)} free "
            f"(${CACHE_ENV} chooses the cache folder)",
        )
    temporary = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=root))
    try:
        for relative, entry in listing.items():
            destination = temporary / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if relative in kept:  # unchanged on storage: taken from the previous copy, not downloaded
                try:
                    os.link(root / key / relative, destination)
                except OSError:  # a file system without hard links
                    shutil.copy2(root / key / relative, destination)
                continue
            source = posixpath.join(base.rstrip("/"), relative)

            def fetch(source: str = source, destination: Path = destination, size: int = int(entry["size"])) -> None:
                fs.get_file(source, str(destination))
                got = destination.stat().st_size
                if got != size:  # a body cut short: transient, fetched again
                    raise ConnectionResetError(errno.ECONNRESET, f"{source}: got {got} of its {size} bytes")

            retry(fetch, what=f"download {uri}/{relative}")
        record = {"uri": uri, "files": listing, "synced_at": time.time(), "pid": os.getpid()}
        (temporary / SYNC_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
        target = root / key
        old = None
        if target.exists():
            old = root / f"{key}.old-{os.getpid()}"
            os.rename(target, old)
        os.rename(temporary, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _size(num_bytes: float) -> str:
    """``1.2 GB``, ``340 MB``, ``500 B``: a size for messages."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} B"
