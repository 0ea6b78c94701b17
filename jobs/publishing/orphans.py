"""Keeping an output tidy: ``--overwrite`` deletes it; each run deletes what failed runs left unpublished."""

from __future__ import annotations

import logging

from actors.storage import Storage
from jobs.planning.output_index import OutputIndex
from schemas.keys import IMAGES_DIR, RESULTS_DIR, STATS_FILE, SUCCESS_FILE
from schemas.shards import DATA_DIR, DATASET_FILE, SHARDS_DIR, part_shard

logger = logging.getLogger(__name__)

REPORT_FILES = ("index.html", "contact_sheet.png")


def delete_output(storage: Storage) -> None:
    """Everything a run writes (``--overwrite``): markers first, so nothing half-deleted counts as done."""
    for key in (SUCCESS_FILE, SHARDS_DIR, DATASET_FILE, STATS_FILE, *REPORT_FILES, RESULTS_DIR, DATA_DIR, IMAGES_DIR):
        storage.delete(key)


def delete_orphans(storage: Storage, index: OutputIndex) -> list[str]:
    """Delete results and data files that no marker lists (a run died before publishing their shard), and the
    temporary files of writes a killed process left (local outputs) in the output's folder, ``results/``,
    ``data/`` and ``shards/``. Call it holding the output's lease: then no write is under way.

    Only files of shards without a marker, or retry parts their shard's marker does not list, are
    orphans; listing ``results/`` and ``data/`` is O(shards). Returns the deleted keys. (PNGs of the
    files format are not listed: a shard rendered again writes the same keys.)
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
            shard = part_shard(part)
            if shard in index.done and (shard not in index.with_errors or _listed(index, shard, part)):
                continue
            logger.warning("deleting %s: written by a run that stopped before publishing its shard", key)
            storage.delete(key)
            deleted.append(key)
    return deleted


def _listed(index: OutputIndex, shard: str, part: str) -> bool:
    return any(p.name == part for p in index.with_errors[shard].parts)
