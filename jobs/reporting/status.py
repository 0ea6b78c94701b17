"""``kandinsky-render status OUTPUT``: the output's final view, one row per image, without superseded rows.

``results/`` keeps every part a shard got (its first rendering, then each ``--retry-errors`` part),
so an image that failed and was rendered again has two rows there. The final view keeps, per image,
its row of the highest ``attempt`` (`schemas.results.final_results`): it is computed shard by shard
from the parts each marker lists (`iter_final`), so memory follows one shard whatever the output's
size. `read_final` is the same table at once; the README's pandas read gives it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.storage import Storage
from jobs.planning.output_index import OutputIndex, read_markers, read_settings, read_shard_results
from jobs.publishing.lease import LEASE_FILE
from jobs.reporting.results import with_absolute_uris
from schemas.keys import SUCCESS_FILE
from schemas.results import RESULTS_SCHEMA, STATUS_OK, with_pandas_metadata

# Columns of the final view: everything but the previews (read the results files for those).
VIEW_COLUMNS = tuple(name for name in RESULTS_SCHEMA.names if name not in ("thumbnail", "input_thumbnails"))
LISTED = ("id", "image_index", "status", "error_kind", "error", "uri", "member")  # what a text listing shows


def iter_final(
    output: str,
    *,
    storage_options: dict[str, Any] | None = None,
    columns: Sequence[str] = VIEW_COLUMNS,
    errors_only: bool = False,
    absolute_uris: bool = True,
) -> Iterator[pa.Table]:
    """The final view of ``output``, one table per shard (in shard order; rows sorted by id, image_index).

    Memory: one shard's results and a chunk of markers at a time, whatever the output's size.

    ``errors_only``: only images whose final status is an error (shards without errors are not read).
    ``absolute_uris``: ``uri`` joined to the output's location (``False``: relative, as stored).
    """
    storage = Storage(output, storage_options=storage_options)
    wanted = list(dict.fromkeys(["id", "image_index", "status", "attempt", "finished_at", *columns]))
    for marker in read_markers(storage):  # listed in key order, fetched a chunk at a time
        if errors_only and not marker.num_errors:
            continue
        table = read_shard_results(storage, marker, columns=wanted)
        if errors_only:
            table = table.filter(pc.not_equal(table.column("status"), STATUS_OK))
        table = table.select(list(columns))
        yield with_absolute_uris(table, storage) if absolute_uris else table


def read_final(output: str, **options: Any) -> pa.Table:
    """`iter_final` as one table, sorted by (id, image_index): for outputs that fit in memory."""
    columns = options.get("columns", VIEW_COLUMNS)
    schema = pa.schema([RESULTS_SCHEMA.field(name) for name in columns])
    table = pa.concat_tables([schema.empty_table(), *iter_final(output, **options)])
    return table.sort_by([("id", "ascending"), ("image_index", "ascending")])


def summary(output: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the output holds, from its markers (O(shards)): counts by status, mode and error kind, the first
    failed images per kind, shards, pinned settings, the last finished run and whether a run holds it now."""
    storage = Storage(output, storage_options=storage_options)
    settings = read_settings(storage)
    if settings is None:
        raise ValueError(f"{output}: not a kandinsky-render output (no _dataset.json)")
    index = OutputIndex.read(storage)
    return {
        "output": output,
        "settings": {"manifest": settings.manifest, "output_format": settings.output_format},
        "num_shards_done": len(index.done),
        "num_shards_with_errors": len(index.with_errors),
        **index.totals.as_dict(),
        "first_failed": index.failed.as_dict(),
        "last_success": _text(storage, SUCCESS_FILE),
        "lease": _lease(storage),
    }


def _lease(storage: Storage) -> dict[str, Any] | None:
    """Who holds the output now (its lease record), or None."""
    text = _text(storage, LEASE_FILE)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return {"unreadable": text}


def _text(storage: Storage, key: str) -> str | None:
    try:
        return storage.read_bytes(key).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None


def summary_text(found: dict[str, Any]) -> str:
    """`summary` for people."""
    by_status = found["by_status"]
    lines = [
        f"output {found['output']} ({found['settings']['output_format']}), manifest {found['settings']['manifest']}",
        f"shards done: {found['num_shards_done']} ({found['num_shards_with_errors']} with error images)",
        f"images: {found['num_images']} (ok {by_status.get('ok', 0)}, error {by_status.get('error', 0)})",
    ]
    for mode, counts in found["by_mode"].items():
        lines.append(f"  {mode}: " + ", ".join(f"{status} {n}" for status, n in counts.items()))
    for kind, count in found["errors_by_kind"].items():
        named = ", ".join(f"{row_id} #{index}" for row_id, index in found["first_failed"].get(kind, []))
        lines.append(f"  error {kind}: {count}" + (f" (first: {named})" if named else ""))
    lines.append(f"last finished run: {found['last_success'] or '-'}")
    lease = found["lease"]
    lines.append(f"held now by run {lease.get('run_id', '?')}" if lease else "no run holds the output now")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 2 when OUTPUT is not an output."""
    parser = argparse.ArgumentParser(prog="kandinsky-render status", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="output prefix of a render job (fsspec URI)")
    parser.add_argument("--errors", action="store_true", help="list the images whose final status is an error")
    parser.add_argument("--all", action="store_true", help="list every image's final row")
    parser.add_argument("--json", action="store_true", help="JSON: one object (summary) or one per line (lists)")
    parser.add_argument("--parquet", metavar="PATH", help="write the final view (or with --errors, its errors) to PATH")
    args = parser.parse_args(argv)
    from jobs.options.storage import redact, resolve, secret_env_values

    options = resolve(environ=os.environ, uris=[args.output, args.parquet or args.output])
    try:
        if args.parquet:
            count = write_final(args.output, args.parquet, storage_options=options, errors_only=args.errors)
            print(f"{count} row(s) of the final view -> {args.parquet}")
        elif args.errors or args.all:
            _list(args.output, storage_options=options, errors_only=args.errors, as_json=args.json)
        else:
            found = summary(args.output, storage_options=options)
            print(json.dumps(found, indent=2, sort_keys=True) if args.json else summary_text(found))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {redact(str(exc), secret_env_values(os.environ))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `status --all | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _list(output: str, *, storage_options: dict[str, Any], errors_only: bool, as_json: bool) -> None:
    if read_settings(Storage(output, storage_options=storage_options)) is None:
        raise ValueError(f"{output}: not a kandinsky-render output (no _dataset.json)")
    shown = 0
    for table in iter_final(output, storage_options=storage_options, errors_only=errors_only):
        for row in table.to_pylist():
            if as_json:
                print(json.dumps(row, default=str, sort_keys=True))
            else:
                where = row["uri"] if row["status"] == STATUS_OK else f"{row['error_kind']}: {row['error']}"
                member = f" [{row['member']}]" if row["member"] and row["status"] == STATUS_OK else ""
                print(f"{row['id']}\t{row['image_index']}\t{row['status']}\t{where}{member}")
            shown += 1
    if not as_json:
        print(f"{shown} image(s)", file=sys.stderr)


def write_final(
    output: str, path: str, *, storage_options: dict[str, Any] | None = None, errors_only: bool = False
) -> int:
    """Write the final view to the Parquet file ``path`` (any fsspec URI), shard by shard; rows written."""
    from fsspec.core import url_to_fs

    schema = with_pandas_metadata(pa.schema([RESULTS_SCHEMA.field(name) for name in VIEW_COLUMNS]))
    fs, target = url_to_fs(path, **(storage_options or {}))
    count = 0
    with fs.open(target, "wb") as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        for table in iter_final(output, storage_options=storage_options, errors_only=errors_only):
            writer.write_table(table.cast(schema))
            count += table.num_rows
    return count
