"""Applying corrections at the end of a run: each shard holding a superseded row is republished without it.

A corrected id's winning row (`jobs.planning.corrections`) renders in its correction file's shard like any row.
Once that shard is done (its marker written: its images and results are durable) and every image of the row is
``ok`` there, each other done shard holding the id is republished without it (`jobs.publishing.republish`). A
correction not rendered yet, or rendered with an error, is held: the rows it would replace stay final, and the
next run tries again (``--retry-errors`` renders its errors again; a later correction file may correct it again).

The pass runs while the output's ``_dataset.json`` does not record the manifest files' digest as applied
(``corrections_applied``); it records it once nothing is held, so a rerun with nothing new reads nothing more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pyarrow.compute as pc

from actors.storage import Storage
from jobs.planning.corrections import is_correction, locate
from jobs.planning.ids import files_digest
from jobs.planning.output_index import OutputIndex, read_shard_results
from jobs.planning.output_log import DoneLookup, read_markers
from jobs.planning.run_plan import RunPlan
from jobs.publishing.log import CompletionLog
from jobs.publishing.markers import write_settings
from jobs.publishing.republish import collect_garbage, republish
from schemas.loggers import logger_for
from schemas.results import STATUS_OK
from schemas.shards import Marker, Shard, marker_key
from schemas.text import quoted

logger = logger_for(__name__)


def apply_corrections(plan: RunPlan, log: CompletionLog, *, run_id: str) -> list[str] | None:
    """Republish the shards whose rows the plan's correction files supersede (the module docstring). Returns the
    shards republished, or None when there was nothing to look at (no correction file, or all applied before)."""
    files = plan.files
    digest = files_digest(files)
    if not any(is_correction(file) for file in files) or plan.settings.corrections_applied == digest:
        return None
    storage = plan.storage
    holders = locate(files, shard_rows=plan.settings.shard_rows, storage_options=plan.config.storage_options)
    markers = done_markers(storage, log.index, {s.name: s for h in holders.values() for s in h.shards}.values())
    held: list[str] = []
    removals: dict[str, set[str]] = {}
    ok_ids: dict[str, set[str]] = {}
    for row_id, found in sorted(holders.items()):
        winner = found.winner
        if winner.name not in markers:
            held.append(f"{quoted(row_id)}: its row in {winner.relpath} is not rendered yet")
            continue
        if winner.name not in ok_ids:
            ok_ids[winner.name] = _ok_ids(storage, markers[winner.name])
        if row_id not in ok_ids[winner.name]:
            held.append(f"{quoted(row_id)}: its row in {winner.relpath} has an error result (see --retry-errors)")
            continue
        for shard in found.superseded:
            if shard.name in markers:
                removals.setdefault(shard.name, set()).add(row_id)
            else:
                held.append(f"{quoted(row_id)}: {shard.relpath} rows [{shard.start}, {shard.stop}) are not rendered")
    republished = []
    for name in sorted(removals):
        new = republish(storage, log, markers[name], removals[name], run_id=run_id, spool_dir=plan.config.spool_dir)
        if new is not None:
            markers[name] = new
            republished.append(name)
    for marker in markers.values():
        collect_garbage(storage, marker)
    if republished:
        logger.info(
            "corrections: %d shard(s) republished without the rows corrected: %s", len(republished), republished
        )
    if held:
        logger.warning(
            "corrections: %d corrected id(s) keep their earlier rows for now (a later run applies them): %s",
            len(held),
            "; ".join(held[:5]),
        )
        return republished
    plan.settings = dataclasses.replace(plan.settings, corrections_applied=digest)
    write_settings(storage, plan.settings)
    return republished


def done_markers(storage: Storage, index: OutputIndex, shards: Iterable[Shard]) -> dict[str, Marker]:
    """The markers of those of ``shards`` that are done, by shard name (read whole)."""
    lookup = DoneLookup(index.done_rows(DoneLookup.COLUMNS))
    keys = []
    for shard in sorted(shards, key=lambda shard: (shard.relpath, shard.start)):
        done = lookup.find(shard.relpath, shard.start, shard.name)
        if done is not None:
            keys.append(marker_key(shard.name, done[0]))
    return {marker.shard: marker for _, marker in read_markers(storage, keys)}


def _ok_ids(storage: Storage, marker: Marker) -> set[str]:
    """The ids whose every image in the shard has an ``ok`` final result."""
    final = read_shard_results(storage, marker.parts)
    failed = set(final.filter(pc.not_equal(final.column("status"), STATUS_OK)).column("id").to_pylist())
    return set(final.column("id").to_pylist()) - failed
