"""Keeping an output tidy: ``--overwrite`` deletes what runs wrote; each run deletes what failed runs left.

Both run only after every check of the run has passed (`jobs.job`), hold the output's lease, and
delete only names the job writes (`schemas.shards.is_own_key`): a file the user put in the folder
stays, whatever folder it is in. Markers go first, so nothing half-deleted counts as done.
"""

from __future__ import annotations

from actors.storage import Storage
from jobs.planning.output_index import OutputIndex
from schemas.keys import IMAGES_DIR, LEASE_FILE, RESULTS_DIR, SUCCESS_FILE
from schemas.logs import logger_for
from schemas.shards import (
    DATA_DIR,
    DATASET_FILE,
    FORMAT_FILES,
    OUTPUT_FILES,
    PART_NAME,
    SHARDS_DIR,
    data_key,
    is_own_key,
    marker_key,
    part_shard,
)

logger = logger_for(__name__)


def delete_output(storage: Storage) -> int:
    """What earlier runs wrote (``--overwrite``): ``_SUCCESS``, the markers, then parts, images and reports.

    ``_dataset.json`` and the lease stay (the run rewrites the one and holds the other): an overwrite that
    is interrupted leaves an output of the job, which the next run finishes cleaning. Returns the number
    of files deleted.
    """
    storage.delete_keys([SUCCESS_FILE])
    markers = [key for key in storage.list_files(SHARDS_DIR) if is_own_key(key)]
    storage.delete_keys(markers)
    keys = [key for folder in (RESULTS_DIR, DATA_DIR, IMAGES_DIR) for key in storage.list_files(folder)]
    keys = [key for key in keys if is_own_key(key)]
    storage.delete_keys(keys)
    storage.delete_keys([name for name in OUTPUT_FILES if name not in (DATASET_FILE, SUCCESS_FILE, LEASE_FILE)])
    _remove_empty_part_folders(storage)
    logger.info("--overwrite: deleted %d marker(s) and %d file(s) of earlier runs", len(markers), len(keys))
    return len(markers) + len(keys)


def delete_orphans(storage: Storage, index: OutputIndex) -> list[str]:
    """Delete what failed runs left: the markers of damaged shards (`OutputIndex.damaged`: a part they name is
    missing; their shard is rendered again), results and data files that no marker lists (a run died before
    publishing their shard), and the temporary files of writes a killed process left (local outputs) in the
    output's folder, ``results/``, ``data/`` and ``shards/``. Call it holding the output's lease: then no
    write is under way.

    Only files of shards without a marker, or retry parts their shard's marker does not list, are
    orphans; listing ``results/`` and ``data/`` is O(shards), and so is listing the files format's part
    folders (``images/<part>/``) without their contents: an unpublished part's ``metadata.parquet``
    goes (`datasets` reads the images its metadata lists, so its PNGs are not read; rendering the part
    again writes the same keys over them). Returns the deleted keys.
    """
    deleted = [marker_key(shard) for shard in sorted(index.damaged)]
    for shard in sorted(index.damaged):
        logger.warning("deleting the marker of shard %s: %s; the shard is rendered again", shard, index.damaged[shard])
    storage.delete_keys(deleted)
    for key in storage.list_temporary((RESULTS_DIR, DATA_DIR, SHARDS_DIR)):
        logger.warning("deleting %s: the temporary file of a write that never finished", key)
        storage.delete(key)
        deleted.append(key)
    for prefix in (RESULTS_DIR, DATA_DIR):
        for key in storage.list_files(prefix):
            if not is_own_key(key):
                continue
            name = key.rsplit("/", 1)[-1]
            part = next(name[: -len(s)] for s in (".parquet", ".tar") if name.endswith(s))
            if not _published(index, part):
                deleted.append(_delete(storage, key))
    for folder in storage.list_folders(IMAGES_DIR):
        if PART_NAME.fullmatch(folder) and not _published(index, folder):
            metadata = data_key(folder, FORMAT_FILES)
            if storage.exists(metadata):  # its PNGs stay: rendering the part again writes the same keys
                deleted.append(_delete(storage, metadata))
    return deleted


def _published(index: OutputIndex, part: str) -> bool:
    shard = part_shard(part)
    return shard in index.done and (
        shard not in index.with_errors or any(p.name == part for p in index.with_errors[shard].parts)
    )


def _delete(storage: Storage, key: str) -> str:
    logger.warning("deleting %s: written by a run that stopped before publishing its shard", key)
    storage.delete(key)
    return key


def _remove_empty_part_folders(storage: Storage) -> None:
    """Local outputs: the files format's part folders left empty by `delete_output` (object stores have none)."""
    if not storage.is_local:
        return
    for folder in storage.list_folders(IMAGES_DIR):
        if PART_NAME.fullmatch(folder) and not storage.list_files(f"{IMAGES_DIR}/{folder}"):
            storage.delete(f"{IMAGES_DIR}/{folder}")
