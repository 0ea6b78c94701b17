"""Keeping an output tidy: ``--overwrite`` deletes what runs wrote; each run deletes what failed runs left.

`nothing_left_if_refused` keeps a refused first run from leaving an empty folder. Both deletes run only after
every check of the run has passed (`jobs.job`), hold the output's lease, and
delete only names the job writes (`schemas.shards.is_own_key`): a file the user put in the folder
stays, whatever folder it is in. The log's pointer goes first, then the markers, so nothing
half-deleted counts as done.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from actors.storage import Storage, UnsafeObjectError
from jobs.planning.output_index import OutputIndex
from schemas.keys import IMAGES_DIR, LAST_CHECKPOINT_FILE, LEASE_FILE, LOG_DIR, RESULTS_DIR, SUCCESS_FILE
from schemas.log import part_objects, row_parts
from schemas.loggers import logger_for
from schemas.shards import (
    DATA_DIR,
    DATASET_FILE,
    IMAGES_METADATA,
    OUTPUT_FILES,
    PART_NAME,
    SEGMENT_NAME,
    SHARDS_DIR,
    is_own_key,
)

logger = logger_for(__name__)


@contextlib.contextmanager
def nothing_left_if_refused(storage: Storage) -> Iterator[None]:
    """Around a run: locally, a file where the output folder should be is refused (`UnsafeObjectError`), and a
    folder that did not exist before and is empty when the run raises (a refused run) is removed. Object stores
    have no folders."""
    if not storage.is_local:
        yield
        return
    if os.path.lexists(storage.root) and not os.path.isdir(storage.root):
        raise UnsafeObjectError(f"{storage.url} is a file, not a folder: give a folder for the output")
    existed = os.path.lexists(storage.root)
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):  # not empty (something was written), or gone
                os.rmdir(storage.root)
        raise


def delete_output(storage: Storage) -> int:
    """What earlier runs wrote (``--overwrite``): ``_SUCCESS`` and the log's pointer, the markers, then the log's
    checkpoints, parts, images and reports.

    ``_dataset.json`` and the lease stay (the run rewrites the one and holds the other): an overwrite that
    is interrupted leaves an output of the job, which the next run finishes cleaning. Returns the number
    of files deleted.
    """
    # Every link checked before the first delete: a refusal halfway would leave a half-deleted output.
    storage.check_links((SHARDS_DIR, LOG_DIR, RESULTS_DIR, DATA_DIR, IMAGES_DIR))
    for name in (*OUTPUT_FILES, LAST_CHECKPOINT_FILE):
        storage.path(name)
    storage.delete_keys([SUCCESS_FILE, LAST_CHECKPOINT_FILE])
    markers = [key for key in storage.list_files(SHARDS_DIR) if is_own_key(key)]
    storage.delete_keys(markers)
    keys = [key for folder in (LOG_DIR, RESULTS_DIR, DATA_DIR, IMAGES_DIR) for key in storage.list_files(folder)]
    keys = [key for key in keys if is_own_key(key)]
    storage.delete_keys(keys)
    storage.delete_keys([name for name in OUTPUT_FILES if name not in (DATASET_FILE, SUCCESS_FILE, LEASE_FILE)])
    _remove_empty_folders(storage)
    logger.info("--overwrite: deleted %d marker(s) and %d file(s) of earlier runs", len(markers), len(keys))
    return len(markers) + len(keys)


def delete_orphans(storage: Storage, index: OutputIndex) -> list[str]:
    """Delete what failed runs left: every marker of the damaged shards (`OutputIndex.damaged_keys`: a part they
    name is missing; their shard is rendered again), the temporary files of writes a killed process left (local
    outputs), and, when the index listed the parts (`OutputIndex.listing`: a small output, or ``--verify-parts``),
    results and data files that no done shard lists (a run died before publishing their shard). Call it holding
    the output's lease (then no write is under way) and after the log's checkpoint left the damaged shards out.

    Without a listing, start-up stays O(new): the files of a shard that is still pending are written over when it
    renders (the same keys), and temporary files are looked for only in the output's folder and ``_log/``. For the
    files format an unpublished part's ``metadata.parquet`` goes, not its PNGs (`datasets` reads the images its
    metadata lists; rendering the part again writes the same keys over them). Returns the deleted keys.
    """
    deleted = list(index.damaged_keys)
    for shard in sorted(index.damaged):
        logger.warning("deleting the marker of shard %s: %s; the shard is rendered again", shard, index.damaged[shard])
    storage.delete_keys(deleted)
    listed = index.listing is not None
    for key in storage.list_temporary((RESULTS_DIR, DATA_DIR, SHARDS_DIR, LOG_DIR) if listed else (LOG_DIR,)):
        logger.warning("deleting %s: the temporary file of a write that never finished", key)
        storage.delete(key)
        deleted.append(key)
    if index.listing is None or index.output_format is None:
        return deleted
    published = {
        key
        for table in index.done_rows(["shard", "parts"])
        for row in table.to_pylist()
        for key, _ in part_objects(row_parts(row, index.output_format))
    }
    orphans = [key for key in sorted(index.listing.sizes) if key not in published and _part_file(key)]
    for key in orphans:
        logger.warning(
            "deleting %s: no done shard lists it (a run stopped before publishing its shard, or its shard was "
            "found damaged and is rendered again)",
            key,
        )
    storage.delete_keys(orphans)
    return deleted + orphans


def _part_file(key: str) -> bool:
    """Whether ``key`` is a part's results or data file (a files-format part's ``metadata.parquet``, not its PNGs)."""
    return (
        is_own_key(key)
        and (not key.startswith(f"{IMAGES_DIR}/") or key.endswith(f"/{IMAGES_METADATA}"))
        and not key.startswith((f"{SHARDS_DIR}/", f"{LOG_DIR}/"))
    )


def _remove_empty_folders(storage: Storage) -> None:
    """Local outputs: the part folders of the files format and the marker segments left empty by `delete_output`
    (object stores have no folders)."""
    if not storage.is_local:
        return
    for top, name in ((IMAGES_DIR, PART_NAME), (SHARDS_DIR, SEGMENT_NAME)):
        for folder in storage.list_folders(top):
            if name.fullmatch(folder) and not storage.list_files(f"{top}/{folder}"):
                storage.delete(f"{top}/{folder}")
