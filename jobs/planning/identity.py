"""Which weights make an image: each checkpoint's identity, resolved by the driver before any model loads.

An identity is where the checkpoint loads from (its public URI, hub id or absolute folder) and a content id, 12 hex
digits that change when its files do:

- a hub id: the commit its revision resolves to (`actors.pins`);
- a checkpoint on object storage: the pinned listing's version (each file's size and ETag / generation);
- a local folder: a digest of every file's path and size, of the whole bytes of every file up to
  `WHOLE_FILE_BYTES` (configs, scheduler configs, weight indexes) and of `SAMPLES` evenly spaced
  `SAMPLE_BYTES`-byte pieces of larger files (weights: a fine-tuned checkpoint differs in every piece, and
  reading 1 MiB of a 5 GB file keeps a run's start-up in milliseconds).

The output pins them (`_dataset.json`), results rows name them (``prior_model``, ``decoder_model``,
``depth_model``), and so do the card, stats.json and ``status``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from actors.pins import Pin
from schemas.models import is_hub_id, is_remote, local_path
from schemas.text import public_uri

CONTENT_ID_DIGITS = 12
WHOLE_FILE_BYTES = 64 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True, kw_only=True)
class CheckpointId:
    """One checkpoint as a run used it: its name (``prior``, ``decoder``...), source and content id."""

    name: str
    source: str
    content: str

    @property
    def short(self) -> str:
        """``decoder@3f2a9c1b7d4e``: what results rows record."""
        return f"{self.name}@{self.content}"

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "content": self.content}


def checkpoint_id(name: str, path: str, pin: Pin | None) -> CheckpointId:
    """The identity of checkpoint ``name`` loading from ``path`` (``pin``: the version the driver resolved for a hub
    id or a URI; None for a folder)."""
    if pin is not None and pin.revision and is_hub_id(path):
        return CheckpointId(name=name, source=path, content=pin.revision[:CONTENT_ID_DIGITS])
    if pin is not None and pin.files:
        return CheckpointId(name=name, source=public_uri(path), content=pin.version[:CONTENT_ID_DIGITS])
    if is_hub_id(path) or is_remote(path):  # not pinned (not loadable): named, no content
        return CheckpointId(name=name, source=public_uri(path), content="unknown")
    folder = os.path.abspath(local_path(path))
    return CheckpointId(name=name, source=folder, content=folder_digest(folder)[:CONTENT_ID_DIGITS])


def folder_digest(folder: str) -> str:
    """sha256 hex of a checkpoint folder's files (see the module docstring); hidden files and folders left out."""
    digest = hashlib.sha256()
    for relative in sorted(_files(folder)):
        path = os.path.join(folder, relative)
        size = os.path.getsize(path)
        digest.update(f"{relative}\0{size}\0".encode())
        with open(path, "rb") as handle:
            if size <= WHOLE_FILE_BYTES:
                digest.update(handle.read())
                continue
            step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
            for k in range(SAMPLES):
                handle.seek(k * step)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return found
