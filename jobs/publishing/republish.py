"""Republishing a done shard without the rows that corrections superseded (docs/corrections.md).

`republish` writes the shard's kept images and final results as one new part (named after every part so far:
``<shard>.retry-<n>``), copying each kept PNG out of the old parts' data; then switches the shard's marker to name
that part alone (one atomic write, `jobs.publishing.log.CompletionLog.replace`); only then deletes the old parts
(`delete_parts`). A crash before the switch leaves the old marker and an unpublished part that the next attempt
writes over (the same name: the marker did not change); a crash after it leaves old parts that no marker names,
which `collect_garbage` deletes on the next pass. Readers see the old parts or the new one, never a mix.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.formats import FORMATS
from actors.scores import empty_scores, score_bin
from actors.storage import Storage
from jobs.publishing.log import CompletionLog
from schemas.keys import sample_key
from schemas.results import SAMPLE_META, STATUS_OK, final_results
from schemas.shards import (
    FORMAT_FILES,
    FORMAT_WEBDATASET,
    Marker,
    Part,
    data_key,
    image_key,
    part_attempt,
    part_images_dir,
    part_name,
    results_key,
)
from schemas.summary import Counts, FailedImages, ImageKey
from schemas.text import stored_id

EMBEDDINGS = ("image_embeds", "negative_image_embeds")  # results columns under --save-embeddings


def shard_results(storage: Storage, marker: Marker) -> pa.Table:
    """The shard's final results (`final_results` over its parts), every column its parts hold."""
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(part.results))) for part in marker.parts]
    return final_results(pa.concat_tables(tables, promote_options="default"))


def republish(
    storage: Storage, log: CompletionLog, marker: Marker, ids: Iterable[str], *, run_id: str, spool_dir: str | None
) -> Marker | None:
    """The shard of ``marker`` published again without the rows of ``ids`` (the module docstring); its new marker,
    or None when its results hold none of them (republished before)."""
    final = shard_results(storage, marker)
    gone = pc.is_in(final.column("id"), value_set=pa.array(sorted(set(ids)), pa.string()))
    if not pc.any(gone).as_py():
        return None
    kept, removed = final.filter(pc.invert(gone)), final.filter(gone)
    output_format = marker.output_format
    name = part_name(marker.shard, max(part_attempt(part.name) for part in marker.parts) + 1)
    rows = kept.to_pylist()
    images = {(r["id"], r["image_index"]): r for r in rows if r["status"] == STATUS_OK and r["uri"] is not None}
    placed: dict[ImageKey, tuple[str, str | None]] = {}
    writer = FORMATS[output_format](storage, part=name, spool_dir=spool_dir)
    try:
        for part in marker.parts:
            wanted = {key for key, row in images.items() if _in_part(row["uri"], part, output_format)}
            for key, png in _pngs(storage, part, output_format, wanted):
                row = images[key]
                meta = {"key": sample_key(*key)} | {field: row[field] for field in SAMPLE_META}
                placed[key] = writer.add(sample_key(*key), png, meta, _embeddings(row, kept.schema))
        missing = sorted(set(images) - set(placed))
        if missing:
            raise RuntimeError(f"shard {marker.shard}: the images of {missing[:5]} are not in its parts' data")
        local = writer.close()
        data_size = os.path.getsize(local)
        storage.put_file(data_key(name, output_format), local)
    finally:
        writer.abandon()
    uris = [placed.get((r["id"], r["image_index"]), (r["uri"], r["member"])) for r in rows]
    kept = kept.set_column(kept.schema.get_field_index("uri"), "uri", pa.array([u for u, _ in uris], pa.string()))
    kept = kept.set_column(kept.schema.get_field_index("member"), "member", pa.array([m for _, m in uris], pa.string()))
    buffer = io.BytesIO()
    pq.write_table(kept, buffer, compression="zstd")
    storage.write_bytes(results_key(name), buffer.getvalue())
    counts, failed = Counts(), FailedImages()
    for r in rows:
        counts.count(status=r["status"], mode=r["mode"], error_kind=r["error_kind"])
        if r["status"] != STATUS_OK:
            failed.add(r["error_kind"], (r["id"], r["image_index"]))
    new_part = Part(
        name=name,
        run_id=run_id,
        results=results_key(name),
        data=data_key(name, output_format),
        num_images=len(rows),
        by_status=counts.as_dict()["by_status"],
        results_size=buffer.getbuffer().nbytes,
        data_size=data_size,
    )
    where = {(stored_id(key[0]), key[1]): value for key, value in placed.items()}
    removed_ids = set(removed.column("id").to_pylist())
    new = Marker(
        **{
            **marker.__dict__,
            **counts.as_dict(),
            "run_id": run_id,
            "parts": (new_part,),
            "sample": tuple(_moved(marker.sample, removed_ids, where, results_key(name))),
            "failed": failed.as_dict(),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": {
                **marker.extra,
                "scores": _scores(
                    marker.extra.get("scores") or {}, kept, removed, removed_ids, where, results_key(name)
                ),
                "superseded": sorted(set(marker.extra.get("superseded", ())) | removed_ids),
            },
        }
    )
    log.replace(new, marker)  # the switch: from here readers see the new part only
    delete_parts(storage, marker.parts, output_format)
    return new


def _in_part(uri: str, part: Part, output_format: str) -> bool:
    """Whether an image's results ``uri`` lies in ``part``'s data."""
    if output_format == FORMAT_FILES:
        return uri.startswith(f"{part_images_dir(part.name)}/")
    return uri == part.data


def _open(storage: Storage, part: Part) -> IO[bytes]:
    assert part.data is not None
    if part.data_size is None:  # a marker of an earlier version: no size to check the object against
        return io.BytesIO(storage.read_bytes(part.data))
    return storage.open_input(part.data, size=part.data_size)


def _pngs(storage: Storage, part: Part, output_format: str, wanted: set[ImageKey]) -> Iterator[tuple[ImageKey, bytes]]:
    """(image, PNG bytes) of the ``wanted`` images of ``part``, streamed from its data."""
    if not wanted:
        return
    if output_format == FORMAT_FILES:
        for key in sorted(wanted):
            yield key, storage.read_bytes(image_key(part.name, *key))
        return
    by_sample = {sample_key(*key): key for key in wanted}
    with _open(storage, part) as handle:
        if output_format == FORMAT_WEBDATASET:
            with tarfile.open(fileobj=handle, mode="r|") as tar:
                for member in tar:
                    sample, _, suffix = member.name.rpartition(".")
                    if suffix == "png" and sample in by_sample:
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        yield by_sample[sample], extracted.read()
            return
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=64, columns=["key", "png"]):
            for sample, png in zip(batch.column("key").to_pylist(), batch.column("png").to_pylist()):
                if sample in by_sample:
                    yield by_sample[sample], png


def _embeddings(row: dict[str, Any], schema: pa.Schema) -> np.ndarray | None:
    """The (2, D) embeddings saved with an image (``--save-embeddings``), or None."""
    if EMBEDDINGS[0] not in schema.names or row[EMBEDDINGS[0]] is None:
        return None
    dtype = schema.field(EMBEDDINGS[0]).type.value_type.to_pandas_dtype()
    return np.array([row[name] for name in EMBEDDINGS], dtype=dtype)


def _moved(
    entries: Iterable[dict[str, Any]], removed: set[str], where: dict[ImageKey, tuple[str, str | None]], results: str
) -> Iterator[dict[str, Any]]:
    """Gallery or score entries of the kept images, naming the new part."""
    gone = {stored_id(row_id) for row_id in removed}
    for entry in entries:
        if entry["id"] in gone:
            continue
        uri, member = where.get((entry["id"], entry["image_index"]), (entry.get("uri"), entry.get("member")))
        yield {**entry, "results": results, "uri": uri, "member": member}


def _scores(
    old: dict[str, Any],
    kept: pa.Table,
    removed: pa.Table,
    removed_ids: set[str],
    where: dict[ImageKey, tuple[str, str | None]],
    results: str,
) -> dict[str, Any]:
    """The shard's CLIP score summary less the removed images' scores (extremes: the kept ones of the old)."""
    if not old.get("count"):
        return old
    scored = removed.filter(
        pc.and_(pc.equal(removed.column("status"), STATUS_OK), removed.column("clip_score").is_valid())
    )
    new = dict(old, histogram=list(old["histogram"]))
    for row in scored.select(["clip_score", "filtered"]).to_pylist():
        new["count"] -= 1
        new["sum"] -= row["clip_score"]
        new["histogram"][score_bin(row["clip_score"])] -= 1
        new["num_filtered"] -= bool(row["filtered"])
    if not new["count"]:
        return empty_scores()
    left = kept.column("clip_score").drop_null()
    new["min"], new["max"] = pc.min(left).as_py(), pc.max(left).as_py()
    for name in ("lowest", "highest"):
        new[name] = list(_moved(old[name], removed_ids, where, results))
    return new


def delete_parts(storage: Storage, parts: Iterable[Part], output_format: str) -> None:
    """Delete the files of ``parts`` (results, data; a files-format part's folder of PNGs)."""
    for part in parts:
        storage.delete_keys([part.results] + ([part.data] if part.data and output_format != FORMAT_FILES else []))
        if output_format == FORMAT_FILES:
            storage.delete(part_images_dir(part.name))


def collect_garbage(storage: Storage, marker: Marker) -> None:
    """Delete what a republish that stopped after its switch left: the files of the shard's attempts before its
    first part (no marker names them)."""
    first = min(part_attempt(part.name) for part in marker.parts)
    names = [part_name(marker.shard, attempt) for attempt in range(first)]
    gone = [
        Part(name=name, run_id="", results=results_key(name), data=data_key(name, marker.output_format),
             num_images=0, by_status={})
        for name in names
    ]  # fmt: skip
    delete_parts(storage, gone, marker.output_format)
