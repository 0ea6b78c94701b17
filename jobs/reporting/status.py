"""``kandinsky-render status OUTPUT``: the output's final view, one row per image, without superseded rows.

``results/`` keeps every part a shard got (its first rendering, then each ``--retry-errors`` part),
so an image that failed and was rendered again has two rows there. The final view keeps, per image,
its row of the highest ``attempt`` (`schemas.results.final_results`): it is computed shard by shard
from the parts the completion log lists for each done shard (`iter_final`), so memory follows one
shard whatever the output's size. `read_final` is the same table at once; the README's pandas read
gives it too. The summary (`summary`) reads the log's pointer and the markers written after its
checkpoint: O(new markers), not O(shards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.storage import Storage, UnsafeObjectError, open_fs
from actors.storage_io import protocols
from jobs.options.flags import plain
from jobs.planning.index_reader import read_index
from jobs.planning.manifests import overlap
from jobs.planning.output_index import read_settings, read_shard_results
from jobs.planning.output_log import PartListing
from jobs.reporting.results import with_absolute_uris
from schemas.keys import LEASE_FILE, SUCCESS_FILE
from schemas.log import part_objects, row_parts
from schemas.loggers import logger_for
from schemas.results import RESULTS_SCHEMA, STATUS_OK, with_pandas_metadata
from schemas.shards import DatasetSettings
from schemas.text import exception_text, file_kind, printable, public_uri, uri_secrets

logger = logger_for(__name__)

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
    on_damaged: Callable[[str, str], None] | None = None,
) -> Iterator[pa.Table]:
    """The final view of ``output``, one table per shard (in shard order; rows sorted by id, image_index).

    Memory: one shard's results and a chunk of markers at a time, whatever the output's size.

    ``errors_only``: only images whose final status is an error (shards without errors are not read).
    ``absolute_uris``: ``uri`` joined to the output's location (``False``: relative, as stored).
    A shard whose marker names a part that is missing or unreadable is left out: ``on_damaged(shard, problem)``
    is told (default: a warning logged); the next run renders it again.
    """
    storage = Storage(output, storage_options=storage_options)
    settings = _settings(storage)
    index = read_index(storage, output_format=settings.output_format)
    listing = index.listing or PartListing.read(storage, settings.output_format)  # every results file is read
    report = on_damaged or (lambda shard, problem: logger.warning("shard %s left out: %s", shard, problem))
    for shard, problem in sorted(index.damaged.items()):
        report(shard, f"{problem}; the next run renders it again")
    wanted = list(dict.fromkeys(["id", "image_index", "status", "attempt", "finished_at", *columns]))
    for rows in index.done_rows(["shard", "num_errors", "parts"]):  # in (manifest file, start) order
        for row in rows.to_pylist():
            if errors_only and not row["num_errors"]:
                continue
            parts = row_parts(row, settings.output_format)
            problem = listing.problem(part_objects(parts))
            if problem is None:
                try:
                    table = read_shard_results(storage, parts, columns=wanted)
                except (ValueError, FileNotFoundError) as exc:
                    problem = str(exc)
            if problem is not None:
                report(row["shard"], f"{problem}; the next run renders it again")
                continue
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


def summary(output: str, *, storage_options: dict[str, Any] | None = None, verify: bool = False) -> dict[str, Any]:
    """What the output holds, from its completion log (the pointer and the markers after its checkpoint): counts by
    status, mode and error kind, the first failed images per kind, shards (and damaged ones: a part missing, resized
    or, verified, not the Parquet file published), pinned settings, the last finished run, whether a run holds it
    now, and what was read of the log. ``verify``: check every part and marker against listings of the output
    (O(shards / 1000) listing requests) and each results part's Parquet footer (one read per part)."""
    storage = Storage(output, storage_options=storage_options)
    settings = _settings(storage)
    index = read_index(storage, output_format=settings.output_format, verify=verify)
    return {
        "output": public_uri(output),
        "settings": {"manifest": settings.manifest, "output_format": settings.output_format},
        "pixels": dataclasses.asdict(settings.pixels) if settings.pixels is not None else None,
        "num_shards_done": index.num_done,
        "num_shards_with_errors": index.num_with_errors,
        "num_shards_damaged": len(index.damaged),
        "damaged": dict(sorted(index.damaged.items())[:FIRST_DAMAGED]),
        **index.totals.as_dict(),
        "first_failed": index.failed.as_dict(),
        "last_success": _last_success(storage),
        "lease": _lease(storage),
        "log": {
            "checkpoint": index.pointer.number if index.pointer else None,
            "markers_since": len(index.recent),
            "parts_checked": index.listing is not None,
            "read_every_marker": index.rebuilt,
            "checkpoint_agrees": index.agrees,
        },
    }


FIRST_DAMAGED = 5  # damaged shards named by `summary`
_RUN_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
_SMALL_FILE = 64 << 10  # the most read of _SUCCESS or _LEASE.json


def _settings(storage: Storage) -> DatasetSettings:
    settings = read_settings(storage)
    if settings is None:
        raise ValueError(f"{public_uri(storage.url)}: not a kandinsky-render output (no _dataset.json)")
    return settings


def _last_success(storage: Storage) -> str | None:
    """The run id ``_SUCCESS`` names, or what is wrong with it."""
    text = _small_text(storage, SUCCESS_FILE)
    if text is None or _RUN_ID.fullmatch(text):
        return text
    return f"<{SUCCESS_FILE} does not hold a run id>"


def _lease(storage: Storage) -> dict[str, Any] | None:
    """Who holds the output now (its lease record: run id, host, pid, times), or None."""
    text = _small_text(storage, LEASE_FILE)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict):
        return {"run_id": f"<{LEASE_FILE} is not a lease record>"}
    kept = {key: record.get(key) for key in ("run_id", "host", "pid", "renewed_at", "expires_at")}
    return {key: value for key, value in kept.items() if isinstance(value, (str, int, float)) and len(str(value)) < 300}


def _small_text(storage: Storage, key: str) -> str | None:
    """A small file of the output as text (read as a regular file inside the output, at most 64 KiB), or None."""
    try:
        return storage.read_bytes(key, max_bytes=_SMALL_FILE).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    except UnsafeObjectError as exc:
        return f"<unreadable: {exc}>"


def pixels_lines(pixels: dict[str, Any] | None) -> list[str]:
    """The pinned checkpoints and settings (`schemas.pinned`), for `summary_text`."""
    if not pixels:
        return ["models: not pinned (rendered by a version that did not record them)"]
    lines = [f"models ({pixels['dtype']}, seed {pixels['seed']}):"]
    lines += [f"  {name}@{c['content']}  {c['source']}" for name, c in sorted(pixels["checkpoints"].items())]
    defaults = ", ".join(f"{name} {value}" for name, value in sorted(pixels["defaults"].items()))
    lines.append(f"  row defaults: {defaults}")
    for entry in pixels.get("mixed") or []:
        lines.append(f"  mixed by run {entry.get('run_id')}: {'; '.join(entry.get('changes') or [])}")
    return lines


def summary_text(found: dict[str, Any]) -> str:
    """`summary` for people (safe for a terminal: `schemas.text.printable`)."""
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
    lines += pixels_lines(found.get("pixels"))
    if found["num_shards_damaged"]:
        lines.append(
            f"damaged shards: {found['num_shards_damaged']} (a part is missing or not what was published; their "
            "images are not counted above and the next run renders them again: with --verify-parts where only the "
            "footer check found the damage)"
        )
        lines += [f"  {shard}: {problem}" for shard, problem in found["damaged"].items()]
    log = found["log"]
    if log["checkpoint_agrees"] is not None:
        agrees = "agrees with" if log["checkpoint_agrees"] else "differs from (the next run rewrites it)"
        lines.append(f"completion log: every marker read and every part listed; the checkpoint {agrees} them")
    elif log["read_every_marker"]:
        lines.append(f"completion log: every marker read ({log['read_every_marker']}); the next run compacts them")
    else:
        checked = "checked against a listing" if log["parts_checked"] else "not listed (status --verify lists them)"
        lines.append(
            f"completion log: checkpoint {log['checkpoint'] or '-'} and {log['markers_since']} marker(s) after it; "
            f"parts {checked}"
        )
    lines.append(f"last finished run: {found['last_success'] or '-'}")
    lease = found["lease"]
    lines.append(f"held now by run {lease.get('run_id', '?')}" if lease else "no run holds the output now")
    return "\n".join(printable(line) for line in lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 2 when OUTPUT is not an output (or PATH is refused), 1 when storage fails."""
    parser = argparse.ArgumentParser(prog="kandinsky-render status", description=plain(__doc__.split("\n")[0]))
    parser.add_argument("output", help="output prefix of a render job (fsspec URI)")
    parser.add_argument("--errors", action="store_true", help="list the images whose final status is an error")
    parser.add_argument("--all", action="store_true", help="list every image's final row")
    parser.add_argument("--json", action="store_true", help="JSON: one object (summary) or one per line (lists)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="trust no checkpoint: read every marker, list every part, read each results file's footer and count "
        "the files format's PNGs (O(shards) requests)",
    )
    parser.add_argument(
        "--parquet", metavar="PATH", help="write the final view (or with --errors, its errors) to PATH, replaced whole"
    )
    args = parser.parse_args(argv)
    from jobs.options.storage import redact, resolve, secret_env_values

    secrets = secret_env_values(os.environ) + [s for uri in (args.output, args.parquet) for s in uri_secrets(uri)]
    try:
        options = resolve(environ=os.environ, uris=[args.output, args.parquet or args.output])
        if args.parquet:
            count = write_final(args.output, args.parquet, storage_options=options, errors_only=args.errors)
            print(printable(f"{count} row(s) of the final view -> {public_uri(args.parquet)}"))
        elif args.errors or args.all:
            _list(args.output, storage_options=options, errors_only=args.errors, as_json=args.json)
        else:
            found = summary(args.output, storage_options=options, verify=args.verify)
            print(json.dumps(found, indent=2, sort_keys=True) if args.json else summary_text(found))
    except BrokenPipeError:  # `status --all | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {printable(redact(str(exc), secrets))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the store kept failing, a full disk: not a traceback
        print(f"error: {printable(redact(exception_text(exc), secrets))}", file=sys.stderr)
        return 1
    return 0


def _list(output: str, *, storage_options: dict[str, Any], errors_only: bool, as_json: bool) -> None:
    shown = 0

    def damaged(shard: str, problem: str) -> None:
        print(printable(f"shard {shard} left out: {problem}"), file=sys.stderr)

    for table in iter_final(output, storage_options=storage_options, errors_only=errors_only, on_damaged=damaged):
        for row in table.to_pylist():
            if as_json:
                print(json.dumps(row, default=str, sort_keys=True))
            else:
                where = row["uri"] if row["status"] == STATUS_OK else f"{row['error_kind']}: {row['error']}"
                member = f" [{row['member']}]" if row["member"] and row["status"] == STATUS_OK else ""
                fields = (row["id"], row["image_index"], row["status"], f"{where}{member}")
                print("\t".join(printable(field) for field in fields))
            shown += 1
    if not as_json:
        print(f"{shown} image(s)", file=sys.stderr)


def write_final(
    output: str, path: str, *, storage_options: dict[str, Any] | None = None, errors_only: bool = False
) -> int:
    """Write the final view to the Parquet file ``path`` (any fsspec URI, outside the output), shard by shard, and
    return the rows written. The file is built aside and replaces ``path`` whole: a failure leaves it as it was.
    Only a regular file is replaced (`refuse_special`), checked before and again just before the replace."""
    if overlap(output, path, storage_options=storage_options):
        raise ValueError(
            f"--parquet {public_uri(path)} lies inside the output {public_uri(output)}: write it elsewhere"
        )
    refuse_special(path, storage_options=storage_options)
    schema = with_pandas_metadata(pa.schema([RESULTS_SCHEMA.field(name) for name in VIEW_COLUMNS]))
    folder, _, name = path.rstrip("/").rpartition("/")
    target = Storage(folder or ".", storage_options=storage_options)
    count = 0
    with tempfile.TemporaryDirectory(prefix="kandinsky-status-") as scratch:
        local = os.path.join(scratch, "final.parquet")
        with pq.ParquetWriter(local, schema, compression="zstd") as writer:
            for table in iter_final(output, storage_options=storage_options, errors_only=errors_only):
                writer.write_table(table.cast(schema))
                count += table.num_rows
        refuse_special(path, storage_options=storage_options)
        target.put_file(name, local)
    return count


def refuse_special(path: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """ValueError naming ``--parquet PATH`` when a local ``path`` exists and is not a regular file (links not
    followed). Replacing it would turn a device (``/dev/null`` when run as root), a FIFO or a symlink (and not the
    file it points to) into a regular file."""
    fs, local = open_fs(path, storage_options)
    if not set(protocols(fs)) & {"file", "local"}:
        return
    try:
        mode = os.lstat(local).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"--parquet {public_uri(path)}: is {file_kind(mode)}, not a regular file; status writes a new file or "
            "replaces a regular one: name another path"
        )
