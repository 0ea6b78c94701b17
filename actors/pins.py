"""A checkpoint's version, resolved once per run by the driver, so that every actor of the run loads exactly it.

Without a pin each actor synced whatever the store held when it started: a checkpoint updated on S3 during a run
gave a restarted or added actor newer weights than its peers, and a sync racing an upload mixed an old
``model_index.json`` with new UNet weights. Now the driver lists each checkpoint on object storage once, before Ray
starts (`pin_checkpoint`), and the actors sync that listing (`actors.weights`): each file's size and version tag
(S3: its ETag, and its VersionId when the bucket keeps versions; GCS: its generation; other stores: what their
listing gives, else the modification time). A hub id is pinned to the commit its revision resolves to
(`jobs.planning.availability`).

The listing is also where keys a local copy cannot hold are found, before Ray starts, naming the key: an empty,
``.`` or ``..`` path segment (``a//b``, ``./c``, ``a/../b``: fetched as a file such a key reads another key, or
lands outside the copy), a key ending in ``/`` that holds bytes, and a key that is both a file and a folder (``vae``
and ``vae/w.bin``). Folder markers are not files and are left out: zero-byte ``prefix/`` keys (the S3 console's
"Create folder"), zero-byte ``name_$folder$`` keys (Hadoop's) and a zero-byte key named like a folder.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from typing import Any

from actors.retry import retry

# Listing fields that tell one version of an object from another, best first (S3 ETag, GCS generation, Azure etag).
_VERSION_FIELDS = ("ETag", "etag", "generation", "LastModified", "mtime", "created")
_HADOOP_MARKER = "_$folder$"
HEAD_THREADS = 4  # version ids of a versioned bucket: one HEAD per file, a few at a time


class CheckpointKeyError(ValueError):
    """An object under a checkpoint's prefix that no local copy can hold; the message names it."""


@dataclass(frozen=True, kw_only=True)
class PinnedFile:
    """One file of a pinned checkpoint: where it lies under the checkpoint, its size and which version it is."""

    path: str  # relative to the checkpoint, "/"-separated, never with an empty, "." or ".." segment
    size: int
    tag: str  # the store's version tag (ETag, generation, modification time): "" when it gives none
    version_id: str | None = None  # S3 VersionId when the bucket keeps versions: the actors read exactly this one


@dataclass(frozen=True, kw_only=True)
class Pin:
    """What every actor of a run loads for one checkpoint: the files of a URI, or the commit of a hub id."""

    uri: str
    files: tuple[PinnedFile, ...] = ()
    revision: str | None = None  # hub: the commit

    @property
    def version(self) -> str:
        """16 hex digits naming this version: the folder of its copy on a node."""
        what = [astuple(file) for file in self.files] if self.files else self.revision
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]

    @property
    def num_bytes(self) -> int:
        return sum(file.size for file in self.files)

    def same_content(self, other: Pin) -> bool:
        """Whether ``other`` lists the same files at the same sizes and tags (version ids aside)."""
        return {(f.path, f.size, f.tag) for f in self.files} == {(f.path, f.size, f.tag) for f in other.files}


def version_tag(info: dict[str, Any]) -> str:
    """The version tag of an object from its listing or HEAD entry (quotes around an ETag kept as the store gives)."""
    return str(next((info[name] for name in _VERSION_FIELDS if info.get(name)), ""))


def pin_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> Pin:
    """The checkpoint folder at fsspec ``uri`` as it is now: one LIST, plus one HEAD per file on a versioned bucket.

    Raises FileNotFoundError when it holds no file and `CheckpointKeyError` naming a key no local copy can hold.
    """
    from actors.storage import open_fs

    fs, root = open_fs(uri, storage_options or {})
    root = root.rstrip("/")
    files = _listed(fs, uri, root)
    if not files:
        raise FileNotFoundError(f"{uri}: no files there")
    if _keeps_versions(fs):
        files = _with_version_ids(fs, uri, root, files)
    return Pin(uri=uri, files=tuple(sorted(files, key=lambda file: file.path)))


def _listed(fs: Any, uri: str, root: str) -> list[PinnedFile]:
    """The files under ``root`` as listed now, folder markers left out, odd keys refused (see the module)."""
    fs.invalidate_cache(root)
    found = retry(lambda: fs.find(root, detail=True, withdirs=False), what=f"list {uri}")
    files: dict[str, PinnedFile] = {}
    for key, info in found.items():
        size = int(info.get("size") or 0)
        if key.rstrip("/") == root:  # the checkpoint's own marker, or an object named like its folder
            if size:
                raise CheckpointKeyError(
                    f"{uri}: object {key!r} holds {size} bytes and is also the checkpoint's folder"
                )
            continue
        if not key.startswith(root + "/"):
            continue
        relative = key[len(root) + 1 :]
        if relative.endswith("/") or relative.endswith(_HADOOP_MARKER):
            if size == 0:
                continue  # a folder marker
            if not relative.endswith(_HADOOP_MARKER):
                raise CheckpointKeyError(
                    f"{uri}: object {key!r} ends with '/' but holds {size} bytes: no file of a local copy can "
                    "have that name; move its bytes to a key without the trailing '/'"
                )
        parts = relative.split("/")
        if any(part in ("", ".", "..") for part in parts) or "\0" in relative:
            raise CheckpointKeyError(
                f"{uri}: object {key!r} has an empty, '.' or '..' path segment: fetched as a file it would read "
                "another key or land outside the checkpoint's folder; rename it (e.g. without '//', './', '../')"
            )
        files[relative] = PinnedFile(path=relative, size=size, tag=version_tag(info))
    folders = {"/".join(path.split("/")[:depth]) for path in files for depth in range(1, path.count("/") + 1)}
    for path, file in list(files.items()):
        if path in folders:
            if file.size:
                inside = next(other for other in files if other.startswith(path + "/"))
                raise CheckpointKeyError(
                    f"{uri}: object {f'{root}/{path}'!r} holds {file.size} bytes and is also the folder of "
                    f"{f'{root}/{inside}'!r}: a local copy cannot hold both; rename one of them"
                )
            del files[path]  # a zero-byte key named like a folder: a marker
    return list(files.values())


def _keeps_versions(fs: Any) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a"})


def _with_version_ids(fs: Any, uri: str, root: str, files: list[PinnedFile]) -> list[PinnedFile]:
    """``files`` with their S3 VersionIds when the bucket keeps versions (one HEAD tells: the first file's)."""

    def head(file: PinnedFile) -> PinnedFile:
        source = f"{root}/{file.path}"
        info = retry(lambda: fs.info(source, refresh=True), what=f"read the version of {uri}/{file.path}")
        version_id = info.get("VersionId")
        if not version_id or version_id == "null":
            return file
        return PinnedFile(path=file.path, size=int(info["size"]), tag=version_tag(info), version_id=version_id)

    first = head(files[0])
    if first.version_id is None:
        return files  # no versions kept: the actors check each file's ETag after they fetch it
    with ThreadPoolExecutor(max_workers=HEAD_THREADS, thread_name_prefix="pin") as pool:
        return [first, *pool.map(head, files[1:])]


def changed_on_store(pin: Pin, storage_options: dict[str, Any] | None = None) -> str | None:
    """How the files of the checkpoint ``pin`` names differ on the store now (one LIST), or None when they do not
    (or cannot be listed: a note, never an error)."""
    from actors.storage import open_fs

    fs, root = open_fs(pin.uri, storage_options or {})
    try:
        now = _listed(fs, pin.uri, root.rstrip("/"))
    except Exception:  # noqa: BLE001 - a store that cannot be listed now has nothing to say here
        return None
    before = {file.path: (file.size, file.tag) for file in pin.files}
    after = {file.path: (file.size, file.tag) for file in now}
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    return f"{len(changed)} file(s) differ, first {changed[0]}" if changed else None
