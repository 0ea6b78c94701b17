"""A cluster that starts with no GPU and gets one from its (fake) autoscaler when the job asks (a module of its
own so that a parallel test run can take it beside tests/test_elastic.py).

The test prints an ELASTIC line with its figure (start to the first image from zero); images lost and duplicated
are checked to be 0 and 0.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.clusters import Cluster, Job
from tests.helpers.elastic import check_once, decoded, new_cluster
from tests.helpers.rows import rows_of, write_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.fault]


@pytest.fixture()
def autoscaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A CPU head whose fake autoscaler adds, on demand, up to one node of 2 CPUs and 1 logical GPU."""
    cluster, root = new_cluster(tmp_path_factory, "kra-")
    try:
        cluster.start_autoscaling_head(
            head_cpus=3, worker_types={"gpu": {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 1}}
        )
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_from_zero_the_job_asks_the_autoscaler_and_renders_on_the_node_it_adds(
    autoscaled: Cluster, tmp_path: Path, tiny_models: str
) -> None:
    rows = rows_of(6)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    job = Job(autoscaled, manifest, output, tiny_models, "--plan-for", "1xL4", "--stage-wait", "300")
    started = time.time()  # the job's process has just started
    code, log = job.finish()
    assert code == 0, log[-4000:]
    assert "asked the autoscaler for 1 GPU(s)" in log and "GPU(s) up after" in log, log[-3000:]
    check_once(output, rows)
    first = decoded(output)[0][0]
    stats = json.loads((output / "stats.json").read_text())
    assert stats["defaults"]["machine"]["gpus"] == 1.0 and stats["stages"]["stages"]["decoder"]["num_gpus"] > 0
    print(f"ELASTIC from zero: job start -> first image {first - started:.1f} s; lost 0, duplicated 0")
