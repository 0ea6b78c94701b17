"""Checkpoints on object storage: each node's copy of exactly the version the run pinned, verified before use.

`local_checkpoint` gives the path a stage passes to ``from_pretrained``. A local folder and a hub id stay as they
are (the hub keeps its downloads in its own cache, ``$HF_HOME``; a hub id loads at its pinned commit, see
`actors.common.ModelStage.revision`). An fsspec URI (``s3://``, ``gs://``, ``az://``, ``hf://``, ...) is synced
into the model cache (``--model-cache``, default ``$KANDINSKY_RENDER_CACHE/models``) as
``<cache>/<name>@<h16 of the URI>/<version>/``, where ``version`` names the `actors.pins.Pin` the driver resolved
for the run: every actor of a run, restarted or added late, loads that version, and a newer one on the store waits
for the next run. Versions sit side by side, so a copy a loading process reads is never replaced by another version
underneath it (a sync racing an upload once gave a job the old ``model_index.json`` with the new UNet weights); a
node keeps the version it syncs and the one used last before it.

Under a lock file in the checkpoint's folder, the first process on a node to ask builds the copy in a temporary
folder it renames into place when whole; processes asking meanwhile wait and find the copy. Each file is fetched at
its pinned version: by its S3 VersionId when the bucket keeps versions (exact, even after an overwrite), else
checked against its pinned ETag (or generation, or modification time) by a HEAD after the fetch; a file that
changed since the pin and whose version the store no longer keeps fails the sync naming it. Files of another
version's copy that are the same (size and tag) are linked, not fetched again.

A copy is verified before each use against the record made with it (sizes, modification times and sha256 of
every file): a file whose size or modification time differs is hashed again, and the whole copy is hashed when it
was last hashed more than `VERIFY_EVERY_S` ago; a file that fails (truncated, rewritten, gone) is fetched again. A
copy cut short by a crash or a full disk stays under a temporary name, removed by the next sync.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.pins import Pin, PinnedFile, pin_checkpoint, version_tag
from actors.retry import is_transient, retry
from schemas.loggers import logger_for
from schemas.models import cache_root, is_remote, local_path

logger = logger_for(__name__)

SYNC_RECORD = ".kandinsky-render-sync.json"  # in a whole copy: what it holds (the pin, each file's digest)
LOCK = ".lock"  # in a checkpoint's folder, beside its versions
LOCK_LOG_S = 30.0  # how often a process waiting for another's download says so
VERIFY_EVERY_S = 600.0  # a copy is hashed whole again when its last whole check is older than this
_PARTIAL = (".tmp-", ".old-")  # prefixes of a checkpoint folder's entries that are no whole copy


class CheckpointChangedError(RuntimeError):
    """A file of a pinned checkpoint changed on the store and its pinned version is gone: this node cannot load it."""


class CheckpointSyncError(RuntimeError):
    """A checkpoint could not be synced onto a node: one line naming it, the cache and the setting that chose it."""


@dataclass(frozen=True, kw_only=True)
class Synced:
    """Where a checkpoint's copy is on this node and what the sync did."""

    path: str
    downloaded: bool  # False: the copy on this node was whole and verified (or the store was unreachable)
    num_files: int
    num_bytes: int
    seconds: float


def local_checkpoint(
    path: str, *, storage_options: dict[str, Any] | None = None, cache: str | None = None, pin: Pin | None = None
) -> str:
    """What to give ``from_pretrained`` for the checkpoint at ``path``: a local folder or hub id as it is, an
    fsspec URI as this node's copy of version ``pin`` (None: as the store holds it now) in ``cache``."""
    if not is_remote(path):
        return local_path(path)
    return sync_checkpoint(path, storage_options=storage_options, cache=cache, pin=pin).path


def models_cache() -> str:
    """Where synced checkpoints live on this node by default: ``$KANDINSKY_RENDER_CACHE/models``."""
    return os.path.join(cache_root(), "models")


def sync_checkpoint(
    uri: str, *, storage_options: dict[str, Any] | None = None, cache: str | None = None, pin: Pin | None = None
) -> Synced:
    """This node's whole, verified copy of version ``pin`` of the checkpoint folder at ``uri`` (see the module).

    Without ``pin`` the store is listed now (a job's actors always get the driver's). Raises FileNotFoundError when
    ``uri`` holds no file, `CheckpointChangedError` when a file's pinned version is gone from the store,
    `actors.retry.StorageUnavailableError` when the store keeps failing, OSError (ENOSPC) when the cache's disk
    cannot hold the copy and `actors.pins.CheckpointKeyError` for a key no copy can hold.
    """
    started = time.monotonic()
    options = storage_options or {}
    folder = Path(cache or models_cache()) / cache_key(uri)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / LOCK, what=uri):
        for leftover in (entry for entry in folder.iterdir() if entry.name.startswith(_PARTIAL)):
            shutil.rmtree(leftover, ignore_errors=True)  # a sync that died (we hold the lock)
        if pin is None:
            try:
                pin = pin_checkpoint(uri, options)
            except Exception as exc:
                copy = _last_used(folder)
                if copy is None or not is_transient(exc):
                    raise
                logger.warning("cannot list %s (%s); using the copy synced earlier at %s", uri, exc, copy)
                return _synced(copy, downloaded=False, started=started)
        target = folder / pin.version
        failed = _failed_files(target, pin)
        if failed == []:
            _used(target)
            return _synced(target, downloaded=False, started=started)
        if failed:
            logger.warning("%s: the copy at %s fails its check (%s); fetching again", uri, target, ", ".join(failed))
        keep = set() if failed is None else set(_paths(pin)) - set(failed)
        _build(uri, pin, folder=folder, keep=keep, options=options)
        _used(target)
        _prune(folder, keep=target)
        synced = _synced(target, downloaded=True, started=started)
        logger.info(
            "synced %s (version %s) into %s: %d file(s), %s in %.1f s",
            uri,
            pin.version,
            target,
            synced.num_files,
            _size(synced.num_bytes),
            synced.seconds,
        )
        return synced


def cache_key(uri: str) -> str:
    """The checkpoint's folder in the cache: the URI's last part, readable, then ``@`` and 16 hex digits of its
    sha256 (distinct per URI; never a prefix of another key's entries, which live inside it)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:48].lstrip(".") or "checkpoint"
    return f"{name}@{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def _paths(pin: Pin) -> list[str]:
    return [file.path for file in pin.files]


def _synced(target: Path, *, downloaded: bool, started: float) -> Synced:
    files = _recorded(target) or {}
    return Synced(
        path=str(target),
        downloaded=downloaded,
        num_files=len(files),
        num_bytes=sum(int(entry["size"]) for entry in files.values()),
        seconds=time.monotonic() - started,
    )


def _recorded(target: Path) -> dict[str, dict[str, Any]] | None:
    """Relative path -> size, tag, sha256, mtime_ns of each file of the whole copy ``target``; None: no whole copy."""
    try:
        return json.loads((target / SYNC_RECORD).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _failed_files(target: Path, pin: Pin) -> list[str] | None:
    """The files of the copy ``target`` that fail their check against its record ([]: it is whole and sound); None
    when there is no whole copy of ``pin`` there. Updates the record's check time after a whole check."""
    try:
        record = json.loads((target / SYNC_RECORD).read_text(encoding="utf-8"))
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if sorted(files) != _paths(pin):
        return None
    whole = time.time() - float(record.get("verified_at") or 0) > VERIFY_EVERY_S
    failed = []
    for relative, entry in files.items():
        try:
            stat = (target / relative).stat()
        except OSError:
            failed.append(relative)
            continue
        if stat.st_size != entry["size"]:
            failed.append(relative)
        elif whole or stat.st_mtime_ns != entry["mtime_ns"]:
            if _sha256(target / relative) != entry["sha256"]:
                failed.append(relative)
            else:
                entry["mtime_ns"] = stat.st_mtime_ns
    if whole and not failed:
        record["verified_at"] = time.time()
        _write_record(target, record)
    return failed


def _build(uri: str, pin: Pin, *, folder: Path, keep: set[str], options: dict[str, Any]) -> None:
    """Version ``pin`` whole in a temporary folder, renamed to ``folder/<version>``: the files of ``keep`` linked from
    the copy there, files another version's copy holds the same linked from it, every other file fetched."""
    from actors.storage import open_fs

    fs, base = open_fs(uri, options)
    base = base.rstrip("/")
    target = folder / pin.version
    sources = {file.path: target / file.path for file in pin.files if file.path in keep}
    sources |= {path: source for path, source in _same_elsewhere(folder, pin, target).items() if path not in sources}
    need = sum(file.size for file in pin.files if file.path not in sources)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(errno.ENOSPC, f"syncing {uri} needs {_size(need)} but {folder} has {_size(free)} free")
    temporary = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL[0]}{pin.version}-", dir=folder))
    try:
        files = {}
        for file in pin.files:
            destination = temporary / file.path
            destination.parent.mkdir(parents=True, exist_ok=True)
            if file.path in sources:
                _link(sources[file.path], destination)
            else:
                _fetch(fs, uri, f"{base}/{file.path}", file, destination)
            stat = destination.stat()
            digest = _sha256(destination)
            files[file.path] = {"size": file.size, "tag": file.tag, "sha256": digest, "mtime_ns": stat.st_mtime_ns}
        record = {"uri": uri, "version": pin.version, "files": files, "verified_at": time.time(), "pid": os.getpid()}
        _write_record(temporary, record)
        old = None
        if target.exists():  # the same version, failing its check: replaced by a sound copy of the same content
            old = Path(tempfile.mkdtemp(prefix=_PARTIAL[1], dir=folder))
            os.rename(target, old / "copy")
        os.rename(temporary, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _same_elsewhere(folder: Path, pin: Pin, target: Path) -> dict[str, Path]:
    """Files of ``pin`` that another version's whole copy holds with the same size and tag, unchanged since synced
    (size and modification time as recorded)."""
    wanted = {(file.path, file.size, file.tag) for file in pin.files if file.tag}
    found: dict[str, Path] = {}
    for copy in (copy for copy in _copies(folder) if copy != target):
        for relative, entry in (_recorded(copy) or {}).items():
            source = copy / relative
            if (relative, entry["size"], entry.get("tag")) in wanted and relative not in found:
                with contextlib.suppress(OSError):
                    stat = source.stat()
                    if (stat.st_size, stat.st_mtime_ns) == (entry["size"], entry["mtime_ns"]):
                        found[relative] = source
    return found


def _fetch(fs: Any, uri: str, source: str, file: PinnedFile, destination: Path) -> None:
    """``source`` at its pinned version into ``destination``; `CheckpointChangedError` when that version is gone."""
    where = f"{uri.rstrip('/')}/{file.path}"

    def changed() -> str | None:
        fs.invalidate_cache(source)
        try:
            info = retry(lambda: fs.info(source), what=f"read the version of {where}")
        except FileNotFoundError:
            return "deleted"
        now = version_tag(info)
        if (int(info.get("size") or 0), now) != (file.size, file.tag):
            return f"{file.tag or 'untagged'} -> {now or 'untagged'}"
        return None

    def once() -> None:
        if file.version_id:
            fs.get_file(source, str(destination), version_id=file.version_id)
        else:
            fs.get_file(source, str(destination))
        got = destination.stat().st_size
        if got != file.size:
            if not file.version_id and (how := changed()):
                raise CheckpointChangedError(_changed_message(where, how, versioned=False))
            raise ConnectionResetError(errno.ECONNRESET, f"{where}: got {got} of its {file.size} bytes")  # retried

    try:
        retry(once, what=f"download {where}")
    except FileNotFoundError as exc:
        how = "its pinned version is gone" if file.version_id else "deleted"
        raise CheckpointChangedError(_changed_message(where, how, versioned=bool(file.version_id))) from exc
    if not file.version_id and (how := changed()):
        raise CheckpointChangedError(_changed_message(where, how, versioned=False))


def _changed_message(where: str, how: str, *, versioned: bool) -> str:
    keeps = "" if versioned else " and the store keeps no older version of it (S3: versioning is off)"
    return (
        f"{where} changed on the store after this run pinned it ({how}){keeps}, so this node cannot load the "
        "version the run's other actors load; rerun: the next run pins the store's version"
    )


def _link(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_record(target: Path, record: dict[str, Any]) -> None:
    partial = target / f"{SYNC_RECORD}.tmp-{os.getpid()}"
    partial.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(partial, target / SYNC_RECORD)


def _copies(folder: Path) -> list[Path]:
    """The whole copies in a checkpoint's folder, the most recently used first."""
    copies = [entry for entry in folder.iterdir() if not entry.name.startswith(".") and (entry / SYNC_RECORD).exists()]
    return sorted(copies, key=lambda copy: _used_at(copy), reverse=True)


def _used(copy: Path) -> None:
    os.utime(copy / SYNC_RECORD)


def _used_at(copy: Path) -> float:
    try:
        return (copy / SYNC_RECORD).stat().st_mtime
    except OSError:
        return 0.0


def _last_used(folder: Path) -> Path | None:
    copies = [copy for copy in _copies(folder) if _sizes_match(copy)]
    return copies[0] if copies else None


def _sizes_match(copy: Path) -> bool:
    """Whether each file of ``copy`` has its recorded size (a copy to fall back on when the store is down)."""
    files = _recorded(copy) or {}
    return bool(files) and all(
        (copy / relative).is_file() and (copy / relative).stat().st_size == entry["size"]
        for relative, entry in files.items()
    )


def _prune(folder: Path, *, keep: Path) -> None:
    """Remove the versions of a checkpoint but ``keep`` and the one used most recently before it."""
    others = [copy for copy in _copies(folder) if copy != keep]
    for copy in others[1:]:
        shutil.rmtree(copy, ignore_errors=True)


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


def _size(num_bytes: float) -> str:
    """``1.2 GB``, ``340 MB``, ``500 B``: a size for messages."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} B"
