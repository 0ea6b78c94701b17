"""Corrections: manifest files under ``corrections/`` of the manifest root, whose rows supersede rendered rows by id.

A correction file follows the manifest contract and renders like any file (its own shards, resumed and
published as usual). What makes it a correction is where it lies: its path under the manifest root starts with
`CORRECTIONS_DIR` (docs/corrections.md says why a folder and not a flag). The id contract changes only there:

- ordinary files keep theirs (every id unique across them, `jobs.planning.ids.check_ids`);
- each correction file's ids are unique within it, and each names an id of an ordinary file (`check_corrections`
  refuses any other, before any model work, naming the file, the row number and the id);
- an id in several correction files: the last file in path order wins (`ordered`: ordinary files, then
  corrections by path), so a correction can itself be corrected by a later file.

`locate` finds, for the corrected ids only, every shard holding one; `jobs.publishing.corrections` republishes
the superseded shards once the winning row is durable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from actors.storage import Storage
from jobs.planning.ids import check_ids, id_batches
from jobs.planning.manifests import ManifestFile, cut_shards
from jobs.planning.output_index import OutputIndex, read_part_results
from schemas.log import row_parts
from schemas.manifest import ManifestError
from schemas.shards import Shard
from schemas.text import public_uri, quoted

CORRECTIONS_DIR = "corrections"  # the manifest root's folder of correction files


def is_correction(file: ManifestFile) -> bool:
    """Whether ``file`` is a correction file (it lies under `CORRECTIONS_DIR` of the manifest root)."""
    return file.relpath.startswith(f"{CORRECTIONS_DIR}/")


def ordered(files: Iterable[ManifestFile]) -> list[ManifestFile]:
    """``files`` in the order rows win: ordinary files first, then correction files by path (the last wins)."""
    return sorted(files, key=lambda file: (is_correction(file), file.relpath))


def check_all_ids(files: Sequence[ManifestFile], *, storage_options: dict[str, Any] | None = None) -> None:
    """The id contract with corrections (the module docstring): `ManifestError` naming what breaks it."""
    ordinary = [file for file in files if not is_correction(file)]
    corrections = [file for file in files if is_correction(file)]
    check_ids(ordinary, storage_options=storage_options)
    for file in corrections:
        check_ids([file], storage_options=storage_options)
    if corrections:
        check_corrections(ordinary, corrections, storage_options=storage_options)


def _ids(file: ManifestFile, storage_options: dict[str, Any] | None) -> Iterable[tuple[int, pa.Array]]:
    for first_row, batch in id_batches(file, storage_options):
        yield first_row, batch.column("id").cast(pa.string())


def check_corrections(
    ordinary: Sequence[ManifestFile], corrections: Sequence[ManifestFile], *, storage_options: dict[str, Any] | None
) -> None:
    """`ManifestError` for a correction row whose id no ordinary file holds (it would correct nothing)."""
    wanted: dict[str, tuple[ManifestFile, int]] = {}
    for file in corrections:
        for first_row, ids in _ids(file, storage_options):
            for offset, row_id in enumerate(ids.to_pylist()):
                wanted.setdefault(row_id, (file, first_row + offset))
    value_set = pa.array(sorted(wanted), pa.string())
    for file in ordinary:
        for _, ids in _ids(file, storage_options):
            for row_id in ids.filter(pc.is_in(ids, value_set=value_set)).to_pylist():
                wanted.pop(row_id, None)
    if wanted:
        row_id, (file, row) = min(wanted.items(), key=lambda item: (item[1][0].relpath, item[1][1]))
        raise ManifestError(
            f"{public_uri(file.uri)}: column 'id', row {row}: id {quoted(row_id)} is not in the manifest: a correction "
            f"file (under {CORRECTIONS_DIR}/) replaces rows already in the manifest; put new rows in a new manifest "
            f"file outside {CORRECTIONS_DIR}/ ({len(wanted)} such id(s))"
        )


def check_gone_ids(
    files: Sequence[ManifestFile],
    index: OutputIndex,
    storage: Storage,
    *,
    output_format: str,
    storage_options: dict[str, Any] | None,
) -> None:
    """`ManifestError` for a row of a file not rendered yet whose id this output rendered from a file that is no
    longer in the manifest (a file renamed and edited, or an id reused after its file left): the output would hold
    the id twice. Reads the ids of the gone files' done shards only (nothing when no rendered file is gone)."""
    listed = {file.relpath for file in files}
    gone = {relpath for relpath in index.files if relpath not in listed}
    new = [file for file in files if file.relpath not in index.files and not is_correction(file)]
    if not gone or not new:
        return
    rendered: dict[str, str] = {}
    gone_set = pa.array(sorted(gone), pa.string())
    for table in index.done_rows(["shard", "relpath", "parts"]):
        for row in table.filter(pc.is_in(table.column("relpath"), value_set=gone_set)).to_pylist():
            for part in row_parts(row, output_format):
                ids = read_part_results(storage, part, columns=("id",)).column("id")
                rendered.update(dict.fromkeys(ids.to_pylist(), row["relpath"]))
    value_set = pa.array(sorted(rendered), pa.string())
    for file in new:
        for first_row, ids in _ids(file, storage_options):
            hits = pc.is_in(ids, value_set=value_set)
            if pc.any(hits).as_py():
                offset = pc.index(hits, True).as_py()
                row_id = ids[offset].as_py()
                raise ManifestError(
                    f"{public_uri(file.uri)}: column 'id', row {first_row + offset}: id {quoted(row_id)} was rendered "
                    f"into this output from {rendered[row_id]}, which is no longer in the manifest: the output would "
                    f"hold it twice. Put {rendered[row_id]} back (a new file adds new ids) and correct rows with a "
                    f"file under {CORRECTIONS_DIR}/, or give the row a new id"
                )


@dataclass(frozen=True)
class Holders:
    """The shards holding one corrected id, in the order rows win: the last is the row that stays."""

    shards: tuple[Shard, ...]

    @property
    def winner(self) -> Shard:
        return self.shards[-1]

    @property
    def superseded(self) -> tuple[Shard, ...]:
        return self.shards[:-1]


def locate(
    files: Sequence[ManifestFile], *, shard_rows: int, storage_options: dict[str, Any] | None = None
) -> dict[str, Holders]:
    """Every id that a correction file holds -> the shards holding it, in the order rows win (`ordered`).

    Reads only the ``id`` column of every file (like the id check); keeps only the corrected ids."""
    files = ordered(files)
    corrected: set[str] = set()
    for file in files:
        if is_correction(file):
            for _, ids in _ids(file, storage_options):
                corrected.update(ids.to_pylist())
    if not corrected:
        return {}
    value_set = pa.array(sorted(corrected), pa.string())
    found: dict[str, list[Shard]] = {}
    for file in files:
        shards = cut_shards(file, shard_rows=shard_rows)
        for first_row, ids in _ids(file, storage_options):
            hits = pc.is_in(ids, value_set=value_set)
            for offset, row_id in zip(pc.indices_nonzero(hits).to_pylist(), ids.filter(hits).to_pylist()):
                row = first_row + offset
                found.setdefault(row_id, []).append(next(s for s in shards if s.start <= row < s.stop))
    return {row_id: Holders(tuple(shards)) for row_id, shards in found.items()}
