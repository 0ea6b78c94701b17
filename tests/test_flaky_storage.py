"""Flaky object storage costs retries, never an image; a store that stays down fails the job, naming the object.

Faults (503 SlowDown, 500s, dropped connections, cut bodies) come from `tests.helpers.faulty_proxy` in front of moto.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.inputs import ImageLoader
from actors.retry import (
    ATTEMPTS_ENV,
    SECONDS_ENV,
    RetryPolicy,
    StorageUnavailableError,
    TruncatedReadError,
    is_transient,
    retry,
)
from actors.storage import Storage
from jobs.job import run_job
from jobs.planning.output_log import RowsSource
from tests.helpers.cli import Outcome, in_process
from tests.helpers.fault_timing import baseline, report
from tests.helpers.faulty_proxy import KINDS, Faults, FaultyProxy
from tests.helpers.images import png
from tests.helpers.rows import MARKERS, STEPS, assert_exactly_one_ok, config_for, raw_results, write_manifest

pytestmark = [pytest.mark.fault]


@pytest.fixture()
def proxy(s3_endpoint: str) -> Iterator[FaultyProxy]:
    """A fault-injecting proxy in front of the moto server, clean until a test sets its faults."""
    server = FaultyProxy(s3_endpoint).start()
    try:
        yield server
    finally:
        server.stop()


def via(options: dict, proxy: FaultyProxy) -> dict:
    """The same storage options, reaching the store through ``proxy``."""
    return {**options, "client_kwargs": {**options["client_kwargs"], "endpoint_url": proxy.url}}


def client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def translated(status: int, code: str, number: int) -> OSError:
    """What s3fs raises for an answer it gave up on: an OSError caused by botocore's ClientError."""
    error = OSError(number, code)
    error.__cause__ = client_error(status, code)
    return error


def test_transient_errors_are_told_from_permanent_ones() -> None:
    from aiohttp import ClientPayloadError, ServerDisconnectedError
    from botocore.exceptions import ConnectionClosedError, FlexibleChecksumError, ReadTimeoutError

    transient = [
        client_error(503, "SlowDown"),
        client_error(500, "InternalError"),
        client_error(429, "TooManyRequestsException"),
        client_error(400, "RequestTimeout"),
        translated(503, "SlowDown", errno.EBUSY),
        translated(500, "500", errno.EREMOTEIO),
        OSError(errno.EBUSY, "Service Unavailable"),  # translated without its cause
        ConnectionResetError(104, "reset"),
        TimeoutError("timed out"),
        ServerDisconnectedError(),
        ClientPayloadError("Response payload is not completed"),
        ConnectionClosedError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        FlexibleChecksumError(error_msg="Expected checksum did not match"),
        TruncatedReadError("read 10 bytes of 20"),
    ]
    permanent = [
        client_error(404, "NoSuchKey"),
        client_error(403, "AccessDenied"),
        client_error(400, "InvalidArgument"),
        FileNotFoundError("absent"),
        PermissionError("denied"),
        FileExistsError("exists"),
        ValueError("not JSON"),
        OSError(errno.EIO, "unknown"),
        StorageUnavailableError("retries spent already"),
    ]
    missing = FileNotFoundError("absent")
    missing.__cause__ = client_error(503, "SlowDown")  # a missing object is missing, whatever caused it
    permanent.append(missing)
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []


def test_retries_are_bounded_in_attempts_and_time_and_name_the_object() -> None:
    calls: list[float] = []

    def failing(exc: Exception, *, until: int | None = None) -> Callable[[], str]:
        def operation() -> str:
            calls.append(time.monotonic())
            if until is None or len(calls) < until:
                raise exc
            return "done"

        return operation

    quick = RetryPolicy(attempts=5, total_s=10, base_s=0.01, max_delay_s=0.05)
    assert retry(failing(ConnectionResetError("reset"), until=3), what="read s3://b/k", policy=quick) == "done"
    assert len(calls) == 3

    calls.clear()
    with pytest.raises(StorageUnavailableError, match=r"write s3://b/results/x\.parquet: the storage kept failing \(5"):
        retry(failing(ConnectionResetError("down")), what="write s3://b/results/x.parquet", policy=quick)
    assert len(calls) == 5

    calls.clear()
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="read s3://b/k"):
        retry(failing(TimeoutError("slow")), what="read s3://b/k", policy=RetryPolicy(attempts=10**6, total_s=0.5))
    assert time.monotonic() - started < 2.0

    calls.clear()
    with pytest.raises(FileNotFoundError):  # never retried
        retry(failing(FileNotFoundError("k")), what="read k", policy=quick)
    assert len(calls) == 1


def test_retry_bounds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ATTEMPTS_ENV, "3")
    monkeypatch.setenv(SECONDS_ENV, "7.5")
    assert (RetryPolicy.from_env().attempts, RetryPolicy.from_env().total_s) == (3, 7.5)
    monkeypatch.setenv(ATTEMPTS_ENV, "0")
    with pytest.raises(ValueError, match=ATTEMPTS_ENV):
        RetryPolicy.from_env()


EVERY_KIND = dict.fromkeys(KINDS, 1.0)


def test_every_storage_operation_survives_a_flaky_store(
    proxy: FaultyProxy, s3_options: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ATTEMPTS_ENV, "12")
    bucket = s3_options["bucket"]
    proxy.set(Faults(rate=0.4, weights=EVERY_KIND, seed=1))
    storage = Storage(f"s3://{bucket}/out", storage_options=via(s3_options["options"], proxy))
    blobs = {f"shards/s{k}.json": json.dumps({"k": k, "pad": "x" * 3000 * k}).encode() for k in range(6)}
    for key, data in blobs.items():
        assert storage.write_bytes(key, data) == f"s3://{bucket}/out/{key}"
    local = tmp_path / "data.tar"
    local.write_bytes(png(1) * 20)
    storage.put_file("data/s0.tar", str(local))
    assert storage.create_exclusive("_LEASE.json", b"mine") is True or storage.read_bytes("_LEASE.json") == b"mine"
    assert storage.create_exclusive("_LEASE.json", b"theirs") is False
    assert storage.list_files("shards", suffix=".json") == sorted(blobs)
    assert storage.read_many([*blobs, "shards/absent.json"]) == [*blobs.values(), None]
    assert all(storage.read_bytes(key) == data for key, data in blobs.items())
    assert storage.read_bytes("data/s0.tar") == local.read_bytes()
    assert storage.exists("data/s0.tar") and not storage.exists("data/s9.tar")
    assert storage.list_level("") == (["data", "shards"], ["_LEASE.json"])
    assert storage.list_level("shards") == ([], sorted(blobs))
    copy = RowsSource(storage, "data/s0.tar", size=local.stat().st_size).copied_to(str(tmp_path))
    assert (tmp_path / "s0.tar").read_bytes() == local.read_bytes() and copy.storage.is_local
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("absent")
    storage.delete("shards")
    assert storage.list_files("shards") == [] and storage.list_files("nothing-here") == []
    assert sum(proxy.counts[k] for k in KINDS) >= 10, proxy.counts


def test_input_images_arrive_whole_or_not_at_all(proxy: FaultyProxy, s3_options: dict) -> None:
    """A connection cut mid-body without a length (or a checksum) to betray it is caught by the size check."""
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    source = png(2, side=128)
    # uploaded without a checksum (as many tools do): botocore cannot validate the body it gets back
    plain = s3fs.S3FileSystem(**options, config_kwargs={"request_checksum_calculation": "when_required"})
    plain.pipe_file(f"{bucket}/in/src.png", source)
    proxy.set(Faults(rate=0.4, weights={"cut": 3.0, "truncate": 1.0, "slow_down": 1.0}, seed=2))
    for _ in range(8):
        loader = ImageLoader(storage_options=via(options, proxy))  # a fresh cache each time
        assert loader.fetch({"uri": f"s3://{bucket}/in/src.png"}, column="image") == source
        assert loader.rgb({"uri": f"s3://{bucket}/in/src.png"}, column="image").size == (128, 128)
    assert proxy.counts["cut"] >= 3, proxy.counts


def test_manifest_reads_survive_a_flaky_store(
    proxy: FaultyProxy, s3_options: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Footers, shards and the streaming id pass (resumed mid-file, each id counted once) through faults."""
    import s3fs

    from jobs.planning import ids
    from jobs.planning.manifests import ShardReader, cut_shards, list_manifest_paths, read_footer

    bucket, options = s3_options["bucket"], s3_options["options"]
    n = 3000
    table = pa.table({"id": [f"row-{i:05d}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=100)
    s3fs.S3FileSystem(**options).put(str(tmp_path / "m.parquet"), f"{bucket}/in/m.parquet")
    monkeypatch.setattr(ids, "BATCH_ROWS", 40)
    monkeypatch.setenv(ATTEMPTS_ENV, "12")
    # small read blocks: the id pass reads the file in many requests, so faults land mid-file
    flaky = {**via(options, proxy), "default_block_size": 2048}
    proxy.set(Faults(rate=0.3, weights=EVERY_KIND, seed=3))
    ((uri, relpath),) = list_manifest_paths(f"s3://{bucket}/in/", storage_options=flaky)
    footer = read_footer(uri, relpath, storage_options=flaky)
    assert footer.num_rows == n and len(footer.row_group_rows) == 30
    assert ids.check_ids([footer], storage_options=flaky) == n
    shards = cut_shards(footer, shard_rows=700)
    with ShardReader(storage_options=flaky) as reader:
        rows = [r for shard in shards for r in reader.read(shard).column("id").to_pylist()]
    assert rows == table.column("id").to_pylist()
    assert sum(proxy.counts[k] for k in KINDS) >= 1, proxy.counts


def test_the_id_pass_resumes_mid_file_counting_every_row_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.planning import ids
    from jobs.planning.manifests import read_footer

    n = 2000
    table = pa.table({"id": [f"row-{i:05d}" for i in range(n)]})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=100)
    footer = read_footer(str(tmp_path / "m.parquet"), "m.parquet")
    opened: list[int] = []

    class Dropping(pq.ParquetFile):
        """The connection drops after a few batches, on each of the first three openings."""

        def iter_batches(self, **kwargs: object) -> Iterator[pa.RecordBatch]:
            opened.append(1)
            for k, batch in enumerate(super().iter_batches(**kwargs)):
                if len(opened) <= 3 and k == 5 + len(opened):
                    raise ConnectionResetError(104, "Connection reset by peer")
                yield batch

    monkeypatch.setattr(ids.pq, "ParquetFile", Dropping)
    monkeypatch.setattr(ids, "BATCH_ROWS", 30)
    monkeypatch.setenv(ATTEMPTS_ENV, "10")
    seen = [row for first, batch in ids.id_batches(footer, None) for row in range(first, first + batch.num_rows)]
    assert seen == list(range(n)) and len(opened) == 4  # every row once, in order, across the reopenings
    opened.clear()
    assert ids.check_ids([footer]) == n  # no row read twice: no false duplicate


def flaky_rows(n: int, bucket: str) -> list[dict]:
    """Half img2img rows reading their source from S3, half text2img."""
    rows = []
    for i in range(n):
        row = {"id": f"r{i:02d}", "prompt": f"picture {i}", "seed": i, **STEPS}
        if i % 2:
            row |= {"mode": "img2img", "image": f"s3://{bucket}/in/src-{i % 3}.png", "strength": 0.7}
        rows.append(row)
    return rows


def put_inputs(bucket: str, options: dict, tmp_path: Path, rows: list[dict]) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    for k in range(3):
        fs.pipe_file(f"{bucket}/in/src-{k}.png", png(10 + k))
    fs.put(write_manifest(tmp_path / "m.parquet", rows), f"{bucket}/in/m.parquet")
    return f"s3://{bucket}/in/m.parquet"


def markers(bucket: str, options: dict) -> list[dict]:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    return [json.loads(fs.cat_file(path)) for path in fs.glob(f"{bucket}/out/{MARKERS}")]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_two_gpus")
def test_job_through_a_flaky_store_renders_every_image_once(
    proxy: FaultyProxy, s3_options: dict, tiny_models: str, tmp_path: Path
) -> None:
    """20% of every request the job makes fail (503 SlowDown, 500, resets before and after the store acts,
    bodies cut short): the job exits normally with every image ok exactly once."""
    bucket, options = s3_options["bucket"], s3_options["options"]
    rows = flaky_rows(24, bucket)
    manifest = put_inputs(bucket, options, tmp_path, rows)
    output = f"s3://{bucket}/out"
    proxy.set(Faults(rate=0.2, weights=EVERY_KIND, seed=4))
    config = config_for(manifest, output, tiny_models, storage_options=via(options, proxy), batch_size=2, shard_rows=4)
    started = time.monotonic()
    summary = run_job(config)
    faults = {k: proxy.counts[k] for k in KINDS}
    report("flaky-store", time.monotonic() - started, f"({proxy.counts['clean']} clean requests, faults {faults})")
    assert sum(faults.values()) >= 20 and all(faults.values()), faults  # many faults, of every kind
    everything = {(r["id"], 0) for r in rows}
    results = raw_results(output, **options)
    assert_exactly_one_ok(results, everything)
    assert len(results) == len(everything)  # no error rows, no duplicates
    done = markers(bucket, options)
    assert len(done) == 6 and sum(m["by_status"].get("ok", 0) for m in done) == 24
    assert summary.stats["output"]["by_status"] == {"ok": 24}
    proxy.set(Faults())
    baseline("flaky-store", lambda: run_job(dataclasses.replace(config, output=f"s3://{bucket}/clean")))


def test_a_store_that_stays_down_fails_the_job_naming_the_object(
    proxy: FaultyProxy,
    s3_options: dict,
    tiny_models: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Every upload of a results file fails: the job exits 1 within a bounded time naming that object, publishes
    no marker for it, and a rerun once the store is back renders only what is missing, each image once.

    The command in this process with the local runner: its writer reads the retry bounds set here (the writers of
    a Ray run are processes of their own, with the environment of that Ray)."""
    bucket, options = s3_options["bucket"], s3_options["options"]
    rows = flaky_rows(4, bucket)
    manifest = put_inputs(bucket, options, tmp_path, rows)
    output = f"s3://{bucket}/out"
    results_uploads = lambda method, path: method == "PUT" and "/results/" in path  # noqa: E731
    proxy.set(Faults(rate=1.0, weights={"internal": 1.0}, applies=results_uploads))
    flaky = via(options, proxy)
    monkeypatch.setenv(ATTEMPTS_ENV, "3")
    monkeypatch.setenv(SECONDS_ENV, "4")

    def render(output: str) -> Outcome:
        return in_process(
            capsys, "render", "--manifest", manifest, "--output", output, "--models", tiny_models, "--runner",
            "local", "--batch-size", "2", "--shard-rows", "2", "--progress", "off", "--storage-option",
            "key=testing", "--storage-option", "secret=testing", "--storage-option",
            "client_kwargs=" + json.dumps(flaky["client_kwargs"]),
            # botocore's own attempts per request down from 5 to 1: the job's bound shows sooner
            "--storage-option", "config_kwargs=" + json.dumps({"retries": {"max_attempts": 1}}),
        )  # fmt: skip

    started = time.monotonic()
    failed = render(output)
    seconds = time.monotonic() - started
    message = next((line for line in failed.err.splitlines() if line.startswith("error:")), "")
    report("store-down", seconds, f"to exit {failed.code} (faults {dict(proxy.counts)}): {message[:400]}")
    assert failed.code == 1, failed.err[-3000:]
    assert message.startswith(f"error: StorageUnavailableError: write s3://{bucket}/out/results/"), message
    assert "the storage kept failing" in message
    assert seconds < 180
    assert markers(bucket, options) == []  # nothing counts as done

    proxy.set(Faults())
    started = time.monotonic()
    rerun = render(output)
    report("store-down rerun", time.monotonic() - started)
    assert rerun.code == 0, rerun.err[-3000:]
    results = raw_results(output, **options)
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == len(rows)
    baseline("store-down", lambda: render(f"s3://{bucket}/clean"))


def test_a_store_that_refuses_every_write_fails_before_rendering(
    proxy: FaultyProxy, s3_options: dict, tiny_models: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100% of writes fail (503 SlowDown): the first one, taking the output's lease, gives up within its bounds."""
    bucket, options = s3_options["bucket"], s3_options["options"]
    manifest = put_inputs(bucket, options, tmp_path, flaky_rows(2, bucket))
    monkeypatch.setenv(ATTEMPTS_ENV, "3")
    monkeypatch.setenv(SECONDS_ENV, "5")
    writes = lambda method, path: method in ("PUT", "POST", "DELETE")  # noqa: E731
    proxy.set(Faults(rate=1.0, weights={"slow_down": 1.0}, applies=writes))
    # botocore's own attempts per request down from 5 to 1 (s3fs still makes 5): the job's bound shows sooner
    flaky = via(options, proxy) | {"config_kwargs": {"retries": {"max_attempts": 1}}}
    config = config_for(manifest, f"s3://{bucket}/out", tiny_models, storage_options=flaky)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=rf"create s3://{bucket}/out/_LEASE\.json: the storage kept"):
        run_job(dataclasses.replace(config, runner="local"))
    report("every-write-refused", time.monotonic() - started, f"(faults {dict(proxy.counts)})")
    assert time.monotonic() - started < 60 and proxy.counts["slow_down"] >= 3
