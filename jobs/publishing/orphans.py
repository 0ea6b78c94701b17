"""Keeping an output tidy: ``--overwrite`` deletes it; each run deletes what failed runs left unpublished."""

from __future__ import annotations

import logging

from actors.storage import Storage
from jobs.planning.output_index import OutputIndex
from schemas.keys import CARD_FILE, IMAGES_DIR, RESULTS_DIR, STATS_FILE, SUCCESS_FILE
from schemas.shards import DATA_DIR, DATASET_FILE, FORMAT_FILES, PART_NAME, SHARDS_DIR, data_key, part_shard

logger = logging.getLogger(__name__)

REPORT_FILES = ("index.html", "contact_sheet.png")


def delete_output(storage: Storage) -> None:
    """Everything a run writes (``--overwrite``): markers first, so nothing half-deleted counts as done."""
    everything = (SUCCESS_FILE, SHARDS_DIR, DATASET_FILE, STATS_FILE, CARD_FILE, *REPORT_FILES)
    for key in (*everything, RESULTS_DIR, DATA_DIR, IMAGES_DIR):
        storage.delete(key)


def delete_orphans(storage: Storage, index: OutputIndex) -> list[str]:
    """Delete results and data files that no marker lists (a run died before publishing their shard), and the
    temporary files of writes a killed process left (local outputs) in the output's folder, ``results/``,
    ``data/`` and ``shards/``. Call it holding the output's lease: then no write is under way.

    Only files of shards without a marker, or retry parts their shard's marker does not list, are
    orphans; listing ``results/`` and ``data/`` is O(shards), and so is listing the files format's part
    folders (``images/<part>/``) without their contents: an unpublished part's ``metadata.parquet``
    goes (`datasets` reads the images its metadata lists, so its PNGs are not read; rendering the part
    again writes the same keys over them). Returns the deleted keys.
    """
    deleted = []
    for key in storage.list_temporary((RESULTS_DIR, DATA_DIR, SHARDS_DIR)):
        logger.warning("deleting %s: the temporary file of a write that never finished", key)
        storage.delete(key)
        deleted.append(key)
    for prefix in (RESULTS_DIR, DATA_DIR):
        for key in storage.list_files(prefix):
            name = key.rsplit("/", 1)[-1]
            part = next((name[: -len(s)] for s in (".parquet", ".tar") if name.endswith(s)), name)
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
