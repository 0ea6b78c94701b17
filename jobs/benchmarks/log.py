"""Mode ``log``: what a rerun and ``status`` cost with the completion log, in requests, seconds and peak memory.

- ``requests``: on S3 (moto behind `jobs.dev.counting_proxy.CountingProxy`), an output of
  ``--done`` finished one-row shards whose manifest prefix gains a file of ``--new`` rows. The job is
  the real one (planner, local runner, writers, markers, the log) with stand-in model stages
  (`jobs.benchmarks.stand_ins`: a model makes no request). Counted: the rerun that renders the new
  rows, ``status``, a rerun with nothing to do, and ``status --verify`` (every marker read and every
  part listed: what ``status`` cost before the log).
- ``local`` / ``s3``: an output of ``--local-shards`` (local disk) / ``--s3-shards`` (moto) done
  one-row shards written through the project's own marker and log code (`write_done_output`), then a
  rerun with nothing to do and ``status``, each in a fresh process (seconds, peak RSS; requests on
  S3). Part files (a small results Parquet, an empty data file) are written only for outputs small
  enough to be listed at every start-up (`schemas.log.VERIFY_MAX_OBJECTS`): above, the measured
  commands list and read none, and the gallery leaves out the previews it cannot find.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobs.benchmarks.common import Mode, machine, peak_rss_mb
from jobs.benchmarks.plan import _fixture, _worker, write_manifests
from jobs.dev.counting_proxy import fresh_filesystems
from schemas.log import VERIFY_MAX_OBJECTS

CASES = ("requests", "local", "s3")
MARKER_BATCH = 2_000  # markers written at once by the fixture (concurrently on S3)


@contextlib.contextmanager
def counted_endpoint() -> Iterator[tuple[Any, dict[str, Any]]]:
    """A moto S3 server on loopback behind a counting proxy: (the proxy, storage options reaching it)."""
    from moto.server import ThreadedMotoServer

    from jobs.dev.counting_proxy import CountingProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with CountingProxy(f"http://127.0.0.1:{port}") as proxy:
            yield proxy, {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": proxy.url}}
    finally:
        server.stop()


def measure(proxy: Any, command: Callable[[], Any]) -> dict[str, Any]:
    """The requests ``command`` makes (by kind, and ``total``) and what it returns (``result``)."""
    fresh_filesystems()
    proxy.reset()
    result = command()
    return {**proxy.snapshot(), "result": result}


def requests_case(args: argparse.Namespace, proxy: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The ``requests`` case (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from jobs.benchmarks.stand_ins import simulated_chain
    from jobs.dev.tiny_models import build_tiny_models
    from jobs.job import run_job
    from jobs.reporting.status import summary
    from schemas.config import JobConfig
    from schemas.models import ModelPaths

    bucket = f"log-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(bucket)

    def put_rows(n: int, day: int) -> None:
        ids = [f"day{day}-{i:05d}" for i in range(n)]
        table = pa.table({"id": ids, "prompt": [f"picture {i} of day {day}" for i in range(n)], "seed": list(range(n))})
        table = table.append_column("height", pa.array([64] * n)).append_column("width", pa.array([64] * n))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        fs.pipe_file(f"{bucket}/manifests/day-{day}.parquet", buffer.getvalue())

    models = Path(build_tiny_models(str(Path(args.work_dir) / "models"))["prior"]).parent
    output = f"s3://{bucket}/out"
    config = JobConfig(
        manifest=f"s3://{bucket}/manifests/",
        output=output,
        runner="local",
        shard_rows=1,
        output_format=args.output_format,
        storage_options=options,
        models=ModelPaths.resolve(models_dir=str(models)),
    )
    build = simulated_chain(prior_seconds=0.0, decoder_seconds=0.0, image_size=64)
    put_rows(args.done, 1)
    started = time.perf_counter()
    run_job(config, build=build)
    built = time.perf_counter() - started
    put_rows(args.new, 2)
    counts = {
        "rerun": measure(proxy, lambda: run_job(config, build=build).stats["num_rendered"]),
        "status": measure(proxy, lambda: summary(output, storage_options=options)["num_shards_done"]),
        "noop_rerun": measure(proxy, lambda: run_job(config, build=build).stats["num_rendered"]),
        "status_verify": measure(
            proxy, lambda: summary(output, storage_options=options, verify=True)["num_shards_done"]
        ),
    }
    print(
        f"S3, {args.done} finished one-row shards + a file of {args.new} rows ({args.output_format}): the rerun "
        f"made {counts['rerun']['total']} requests ({counts['rerun']['result']} shards rendered), status "
        f"{counts['status']['total']}, a no-op rerun {counts['noop_rerun']['total']}, status --verify (every "
        f"marker, as before the log) {counts['status_verify']['total']}",
        flush=True,
    )
    return {
        "done": args.done, "new": args.new, "output_format": args.output_format,
        "fixture_seconds": round(built, 1), **counts,
    }  # fmt: skip


def write_done_output(
    manifest: str, output: str, *, storage_options: dict[str, Any], compact_every: int, with_parts: bool
) -> int:
    """An output where every one-row shard of ``manifest`` is done: `_dataset.json`, one marker per shard (as
    `jobs.publishing.markers.new_marker` makes it, one gallery candidate each) written `MARKER_BATCH` at a time
    into the log's segments, a compaction every ``compact_every`` markers, and ``with_parts`` each shard's results
    (a small Parquet file) and data file (empty). Returns the shards written."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.scores import empty_scores
    from actors.storage import Storage
    from jobs.planning.ids import files_digest
    from jobs.planning.manifests import cut_shards, list_manifest_paths, read_footer, with_content_digest
    from jobs.planning.output_index import OutputIndex
    from jobs.publishing.log import CompletionLog
    from jobs.publishing.markers import new_marker, write_settings
    from schemas.keys import sample_rank
    from schemas.shards import DatasetSettings, data_key, results_key
    from schemas.summary import Counts, PartSummary

    storage = Storage(output, storage_options=storage_options)
    listed = list_manifest_paths(manifest, storage_options=storage_options)
    files = [
        with_content_digest(read_footer(uri, rel, storage_options=storage_options), known=None) for uri, rel in listed
    ]
    settings = DatasetSettings(
        manifest=manifest.rstrip("/"), output_format="webdataset", shard_rows=1, ids_checked=files_digest(files)
    )
    write_settings(storage, settings)
    log = CompletionLog(storage, OutputIndex(output_format="webdataset"), run_id="synthetic", compact_every=1 << 40)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["synthetic"], "image_index": pa.array([0], pa.int32())}), buffer)
    results_bytes = buffer.getvalue()
    counts = Counts.from_dict(
        {"num_images": 1, "by_status": {"ok": 1}, "by_mode": {"text2img": {"ok": 1}}, "errors_by_kind": {}}
    )
    batch: list[tuple[str, Any]] = []
    written = 0

    def flush() -> None:
        blobs = {key: marker.to_json() for key, marker in batch}
        if with_parts:
            for _, marker in batch:
                blobs |= {marker.parts[0].results: results_bytes, marker.parts[0].data: b""}
        if storage.is_local:
            for key, data in blobs.items():  # no fsync per file: a fixture, not a run
                os.makedirs(os.path.dirname(storage.path(key)), exist_ok=True)
                with open(storage.path(key), "wb") as handle:
                    handle.write(data)
        else:
            storage.fs.pipe({storage.path(key): data for key, data in blobs.items()})
        for _, marker in batch:
            log.published(marker)
        batch.clear()

    for file in files:
        for shard in cut_shards(file, shard_rows=1):
            row_id = shard.name  # one image per shard: distinct ids for the gallery's sample
            entry = {
                "id": row_id, "image_index": 0, "status": "ok", "error": None, "error_kind": None, "seed": 0,
                "width": 512, "height": 512, "mode": "text2img", "prompt": "a synthetic shard",
                "rank": sample_rank(row_id, 0), "uri": data_key(shard.name, "webdataset"),
                "member": f"{row_id}.png", "results": results_key(shard.name),
            }  # fmt: skip
            summary = PartSummary(
                part=shard.name, shard=shard.name, run_id="synthetic", results=results_key(shard.name),
                data=data_key(shard.name, "webdataset"), counts=counts, busy_seconds={"prior": 0.1, "decoder": 1.0},
                ok_busy_seconds={"prior": 0.1, "decoder": 1.0, "images": 1}, scores=empty_scores(), sample=(entry,),
                results_size=len(results_bytes), data_size=0,
            )  # fmt: skip
            batch.append((log.marker_key(shard.name), new_marker(shard, summary, output_format="webdataset")))
            written += 1
            if len(batch) >= MARKER_BATCH:
                flush()
                if log.since >= compact_every:
                    log.compact()
    flush()
    log.compact()
    return written


def scale_case(args: argparse.Namespace, *, where: str, num_shards: int, proxy: Any, options: dict[str, Any]) -> dict:
    """The ``local`` or ``s3`` case: the fixture (reused from ``--work-dir`` locally), then a no-op rerun and
    ``status`` in fresh processes."""
    import s3fs

    root = Path(args.work_dir) / f"log-{where}-{num_shards}"
    manifests = root / "manifests"
    _fixture(manifests, lambda: write_manifests(manifests, num_rows=num_shards, num_files=args.files))
    if where == "local":
        manifest, output = str(manifests), str(root / "out")
        if not (root / "out" / ".complete").exists():
            _fresh_output(root / "out")
    else:
        bucket = f"log-{uuid.uuid4().hex[:10]}"
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir(bucket)
        fs.put(str(manifests) + "/", f"{bucket}/manifests/", recursive=True)
        for stale in fs.find(f"{bucket}/manifests/"):
            if stale.endswith(".complete"):
                fs.rm(stale)
        manifest, output = f"s3://{bucket}/manifests", f"s3://{bucket}/out"
    started = time.perf_counter()
    if where == "s3" or not (root / "out" / ".complete").exists():
        written = write_done_output(
            manifest, output, storage_options=options, compact_every=args.compact_every,
            with_parts=num_shards <= VERIFY_MAX_OBJECTS,
        )  # fmt: skip
        if where == "local":
            (root / "out" / ".complete").touch()
    else:
        written = num_shards
    fixture = time.perf_counter() - started
    found: dict[str, Any] = {
        "num_shards": num_shards, "written": written, "part_files": num_shards <= VERIFY_MAX_OBJECTS,
        "fixture_seconds": round(fixture, 1),
    }  # fmt: skip
    for command in ("rerun", "status"):
        argv = ["log-worker", "--command", command, "--manifest", manifest, "--output", output]
        argv += ["--storage-options", json.dumps(options)]
        if proxy is not None:
            fresh_filesystems()
            proxy.reset()
        found[command] = _worker(argv)
        if proxy is not None:
            found[command]["requests"] = proxy.snapshot()
    for command in ("rerun", "status"):
        run = found[command]
        requests = f", {run['requests']['total']} requests" if "requests" in run else ""
        print(
            f"{where}, {num_shards:,} done shards: {command} {run['seconds']:.2f} s, peak RSS "
            f"{run['peak_rss_mb']:.0f} MB{requests} ({run['summary']})",
            flush=True,
        )
    return found


def _fresh_output(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def log_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh process: a rerun with nothing to do (the job itself, local runner) or ``status``."""
    from jobs.job import run_job
    from jobs.reporting.status import summary
    from schemas.config import JobConfig

    options = json.loads(args.storage_options)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    if args.command == "rerun":
        with tempfile.TemporaryDirectory() as spool:
            config = JobConfig(
                manifest=args.manifest, output=args.output, runner="local", storage_options=options, spool_dir=spool
            )
            stats = run_job(config).stats
        text = f"{stats['num_shards']:,} shards, {stats['num_shards_rendered']} rendered"
    else:
        found = summary(args.output, storage_options=options)
        text = f"{found['num_shards_done']:,} shards done, {found['num_images']:,} images"
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_imports_mb": round(baseline, 1),
        "summary": text,
    }


def run_log(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``log`` (see the module docstring)."""
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-")
    result: dict[str, Any] = {"mode": "log", "machine": machine()}
    if "local" in args.cases:
        result["local"] = scale_case(args, where="local", num_shards=args.local_shards, proxy=None, options={})
    if {"requests", "s3"} & set(args.cases):
        with counted_endpoint() as (proxy, options):
            if "requests" in args.cases:
                result["requests"] = requests_case(args, proxy, options)
            if "s3" in args.cases:
                result["s3"] = scale_case(args, where="s3", num_shards=args.s3_shards, proxy=proxy, options=options)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark log``."""
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="what to measure")
    parser.add_argument("--done", type=int, default=240, help="requests: finished one-row shards")
    parser.add_argument("--new", type=int, default=4, help="requests: rows of the manifest file added")
    parser.add_argument("--output-format", default="files", help="requests: the output's format")
    parser.add_argument("--local-shards", type=int, default=1_000_000, help="local: done shards")
    parser.add_argument("--s3-shards", type=int, default=100_000, help="s3: done shards")
    parser.add_argument("--files", type=int, default=20, help="local, s3: manifest files")
    parser.add_argument(
        "--compact-every", type=int, default=100_000, help="local, s3: markers between the fixture's compactions"
    )
    parser.add_argument("--work-dir", help="where fixtures go (default: a new temp dir; the local one is reused)")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the hidden ``log-worker`` mode."""
    parser.add_argument("--command", choices=("rerun", "status"), required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--storage-options", default="{}")


MODES = (
    Mode(name="log", help="requests, seconds and memory of a rerun and status with the completion log",
         add_arguments=add_arguments, run=run_log),
    Mode(name="log-worker", help=None, add_arguments=add_worker_arguments, run=log_worker),
)  # fmt: skip
