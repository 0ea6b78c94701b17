"""Killed mid-run and nothing lost: the driver SIGKILLed at a random moment (S3, webdataset), a decoder actor
SIGKILLed (Ray replaces it). A module of its own so that a parallel test run can take it beside
tests/test_robustness.py."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.job import run_job
from schemas.keys import LEASE_FILE
from tests.helpers.cli import clean_env, command, in_process
from tests.helpers.places import REPO
from tests.helpers.reference import load_png, max_level_difference
from tests.helpers.rows import MARKERS, assert_exactly_one_ok, config_for, raw_results, rows_of, write_manifest


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_leftovers(pids: list[int]) -> None:
    """Processes of a SIGKILLed driver's private Ray that outlive it, killed by their own pids."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.fault
@pytest.mark.usefixtures("ray_two_gpus")
def test_driver_sigkill_at_a_random_moment_then_rerun_on_s3(
    tmp_path: Path, tiny_models: str, s3_options: dict, capsys: pytest.CaptureFixture
) -> None:
    """webdataset shards on S3: a SIGKILLed driver leaves only whole, marked shards; a rerun does the rest once.
    The killed driver is the CLI in a process of its own; the rerun, the same command in this process."""
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    fs = s3fs.S3FileSystem(**options)
    rows = rows_of(8, num_images=2)
    fs.put(write_manifest(tmp_path / "m.parquet", rows), f"{bucket}/in/m.parquet")
    output = f"s3://{bucket}/out"
    env = clean_env()
    args = ["--manifest", f"s3://{bucket}/in/", "--output", output,
            "--models", tiny_models, "--batch-size", "2", "--shard-rows", "2", "--output-format", "webdataset",
            "--lease-ttl", "30", "--storage-option", "key=testing", "--storage-option", "secret=testing",
            "--storage-option", "client_kwargs=" + json.dumps(options["client_kwargs"])]  # fmt: skip
    driver = subprocess.Popen(
        [*command(module="jobs.render"), *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    markers = []
    target = random.Random().randint(1, 3)  # a random moment: after 1 to 3 of the 4 shards
    while time.monotonic() < deadline and driver.poll() is None:
        fs.invalidate_cache()
        markers = fs.glob(f"{bucket}/out/{MARKERS}")
        if len(markers) >= target:
            break
        time.sleep(0.2)
    children = _descendants(driver.pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1)
    _kill_leftovers(children)
    assert markers, driver.stderr.read().decode()[-2000:] if driver.stderr else "no shard done before the deadline"

    fs.invalidate_cache()
    done = [json.loads(fs.cat_file(m)) for m in fs.glob(f"{bucket}/out/{MARKERS}")]
    for marker in done:  # a marker is written last: its tar and results are whole
        (part,) = marker["parts"]
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{bucket}/out/{part['data']}"))) as tar:
            assert len(tar.getnames()) == 3 * part["num_images"]  # <key>.json, .png and .txt per image
    first_done = sum(m["num_images"] for m in done)
    rerun = in_process(capsys, "render", *args)
    assert rerun.code == 0, rerun.err[-3000:]
    everything = {(r["id"], i) for r in rows for i in range(2)}
    results = raw_results(output, **options)
    assert_exactly_one_ok(results, everything)
    assert len(results) == len(everything)  # no results file of an unpublished shard is left behind
    stats = json.loads(fs.cat_file(f"{bucket}/out/stats.json"))
    assert stats["num_rendered"] == len(everything) - first_done  # only the shards the first run had not finished
    assert stats["num_skipped_already_final"] == first_done
    fs.invalidate_cache()
    members = []
    for tar_path in fs.glob(f"{bucket}/out/data/*.tar"):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(tar_path))) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    members.append(member.name)
                    Image.open(tar.extractfile(member)).load()  # a whole PNG
    assert len(members) == len(set(members)) == len(everything)  # every image exactly once across the tars
    assert not fs.exists(f"{bucket}/out/{LEASE_FILE}")


@pytest.mark.usefixtures("ray_two_gpus")
@pytest.mark.fault
def test_killed_decoder_actor_is_replaced_and_nothing_is_lost(tmp_path: Path, tiny_models: str) -> None:
    import ray

    rows = rows_of(12, num_inference_steps=6)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    calm = run_job(config_for(manifest, str(tmp_path / "calm"), tiny_models, batch_size=2))
    assert calm.stats["num_rendered"] == 12

    outcome: dict = {}
    job = threading.Thread(
        target=lambda: outcome.update(
            summary=run_job(config_for(manifest, str(tmp_path / "hit"), tiny_models, batch_size=2, shard_rows=2))
        ),  # fmt: skip
    )
    job.start()
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and job.is_alive():
        parts = sorted((tmp_path / "hit" / "results").glob("*.parquet")) if (tmp_path / "hit").exists() else []
        if parts:  # the decoder actor's pid is in every results row ("host:pid gpus=...")
            worker = pq.read_table(parts[0], columns=["decoder_worker"]).column(0)[0].as_py()
            killed = int(worker.split(":")[1].split()[0])
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    job.join(timeout=300)
    assert killed is not None, "the decoder actor was never seen alive mid-run"
    assert ray.is_initialized()
    summary = outcome["summary"]
    results = raw_results(str(tmp_path / "hit"))
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == 12  # no duplicate results rows, no error rows
    assert killed not in {int(r["decoder_worker"].split(":")[1].split()[0]) for r in results[-2:]}
    calm_results = {r["id"]: r for r in raw_results(str(tmp_path / "calm"))}
    for r in results:
        assert max_level_difference(load_png(r["uri"]), load_png(calm_results[r["id"]]["uri"])) <= 1
    assert summary.stats["num_rendered"] == 12
