"""Node loss on a real two-node Ray cluster on this machine: the only node a stage may run on is SIGKILLed mid-run.

(A lost node whose work other nodes can take, its calls re-run there and each image kept once, is
`tests/test_elastic.py::test_pools_grow_onto_a_joining_node_shrink_with_a_lost_one_and_grow_back`.)

A head and worker nodes (`tests.helpers.clusters`: `ray start`, logical GPUs, own ports and token) are started
and stopped by the test by their own process ids; a kill sends SIGKILL to every process of the node, by pid.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clusters import Cluster
from tests.helpers.clusters import Job as RenderJob
from tests.helpers.fault_timing import baseline, report
from tests.helpers.rows import MARKERS, assert_exactly_one_ok, raw_results, rows_of, write_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.fault]

PRIOR_LABEL = "kandinsky-render/stage=prior"
DECODER_LABEL = "kandinsky-render/stage=decoder"
# The layout these tests were written for: the CLIP stages on the head's labelled GPUs, decoders 1 GPU each.
PINNED = (
    "--layout",
    "dedicated",
    "--prior-gpus",
    "1",
    "--decoder-gpus",
    "1",
    "--prior-node-label",
    PRIOR_LABEL,
    "--num-writer-actors",
    "1",
    "--num-prior-actors",
    "1",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One head (2 logical GPUs, the prior label); the test adds the worker nodes it kills."""
    root = Path(tempfile.mkdtemp(prefix="krn-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    cluster = Cluster(root, tmp_path_factory.mktemp("cluster-logs"))
    try:
        cluster.start_head(labels=PRIOR_LABEL)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def Job(cluster: Cluster, manifest: str, output: Path, models: str, *extra: str, **kwargs: Any) -> RenderJob:  # noqa: N802
    """The job on this module's pinned layout."""
    return RenderJob(cluster, manifest, output, models, *PINNED, *extra, **kwargs)


def check_every_image_once(output: Path, rows: list[dict]) -> None:
    results = raw_results(str(output))
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == len(rows)  # no error rows, no duplicate rows
    counts = [json.loads(p.read_text())["by_status"] for p in output.glob(MARKERS)]
    assert sum(c.get("ok", 0) for c in counts) == len(rows) and not any(c.get("error") for c in counts)


@pytest.mark.slow
def test_a_stage_whose_only_node_died_stops_the_job_and_a_rerun_finishes(
    cluster: Cluster, tmp_path: Path, tiny_models: str
) -> None:
    """Decoders may only run on nodes labelled `DECODER_LABEL`, and the only one dies: after --stage-wait the
    job stops naming the stage and what it lacks; with a new such node a rerun renders what is missing, once."""
    worker = cluster.add_worker(labels=DECODER_LABEL)
    rows = rows_of(12, num_inference_steps=2)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    pinned = ("--num-decoder-actors", "1", "--decoder-node-label", DECODER_LABEL)
    # The decoders' first load (30+ s seen on a busy machine) does not count: only time with no actor up or loading
    waiting = (*pinned, "--stage-wait", "8")
    baseline("decoder-node-lost", lambda: Job(cluster, manifest, tmp_path / "clean", tiny_models, *pinned).finish())
    started = time.monotonic()
    job = Job(cluster, manifest, output, tiny_models, *waiting)
    assert job.wait_for_markers(2), job.finish(10)[1][-3000:]
    killed_at = time.monotonic()
    cluster.kill(worker)
    code, log = job.finish()
    stopped = time.monotonic() - killed_at
    report("decoder-node-lost", time.monotonic() - started, f"to exit {code} ({stopped:.1f} s after the kill)")
    assert code == 1, log[-4000:]
    error = log.strip().splitlines()[-1]
    print(error)
    assert "stage decoder: no actor has been up for" in error and "--stage-wait 8" in error, error
    assert f"on nodes labelled {DECODER_LABEL}" in error and "a rerun finishes the work" in error, error
    assert 8 <= stopped < 120
    done_before = len(list(output.glob(MARKERS)))
    assert 2 <= done_before < 6

    cluster.add_worker(labels=DECODER_LABEL)
    rerun_started = time.monotonic()
    code, log = Job(cluster, manifest, output, tiny_models, *pinned).finish()
    report("decoder-node-lost rerun", time.monotonic() - rerun_started, f"to exit {code}")
    assert code == 0, log[-4000:]
    check_every_image_once(output, rows)
    stats = json.loads((output / "stats.json").read_text())
    assert stats["num_skipped_already_final"] == 2 * done_before
    assert stats["num_rendered"] == len(rows) - 2 * done_before
