"""Elastic pools on real Ray clusters on this machine: nodes that join, leave and come back mid-run, and planned
GPUs that never come (a cluster that gets its GPU from its autoscaler: tests/test_autoscaling.py).

Each test prints ELASTIC lines with its figures (node join to its first decoded image, images/s before and
after a join, start to the first image from zero); images lost and duplicated are checked to be 0 and 0.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.defaults import Machine
from jobs.execution.capacity import await_gpus
from tests.helpers.clusters import Cluster, Job
from tests.helpers.elastic import check_once, decoded, new_cluster
from tests.helpers.rows import rows_of, write_manifest

pytestmark = [pytest.mark.cluster, pytest.mark.fault]


@pytest.fixture(scope="module")
def cpu_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A head with CPUs only: every GPU comes with a worker node the test adds."""
    cluster, root = new_cluster(tmp_path_factory, "kre-")
    try:
        cluster.start_head(num_cpus=3, num_gpus=0)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def wait_until(condition, timeout: float, job: Job) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.process.poll() is None:
        if condition():
            return True
        time.sleep(0.2)
    return False


PACE_S = 4.0  # seconds each decoder call sleeps while a test holds the gate (`tests.helpers.gated_render`)


def test_a_run_planned_for_gpus_waits_exactly_the_stage_wait_then_takes_its_request_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[list[dict]] = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda *, bundles: asked.append(bundles))
    planned = Machine(cpus=4, autoscaler=True, planned_gpus=2)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        await_gpus(planned, wait_s=0.3, read=lambda: Machine(cpus=4, autoscaler=True), poll_s=0.1)
    assert 0.3 <= time.monotonic() - started < 1.5
    assert re.search(r"waited 0\.[3-9] s \(--stage-wait 0\.3\) for 2 GPU\(s\)", str(error.value)), error.value
    assert "autoscaler did not add a GPU node" in str(error.value), error.value
    assert asked == [[{"GPU": 1.0}, {"GPU": 1.0}], []]  # asked, then taken back: no node launched for nothing
    reads = iter([Machine(cpus=4), Machine(cpus=4), Machine(cpus=6, gpus=1)])
    up = await_gpus(Machine(cpus=4, planned_gpus=2), wait_s=10, read=lambda: next(reads), poll_s=0.01)
    assert (up.gpus, up.planned_gpus, up.cpus) == (1, 2, 6)


@pytest.mark.slow
def test_planned_gpus_that_never_come_stop_the_job_after_the_stage_wait_naming_what_it_waited_for(
    cpu_head: Cluster, tmp_path: Path, tiny_models: str
) -> None:
    """Before any worker joins ``cpu_head``: no GPU and no autoscaler to add one."""
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    code, log = Job(cpu_head, manifest, tmp_path / "out", tiny_models, "--plan-for", "1xL4",
                    "--stage-wait", "1").finish()  # fmt: skip
    error = log.strip().splitlines()[-1]
    assert code == 1, log[-3000:]
    assert re.search(r"waited 1(\.\d)? s \(--stage-wait 1\) for 1 GPU\(s\)", error), error
    assert "No autoscaler runs" in error, error
    assert not (tmp_path / "out" / "shards").exists()


@pytest.mark.slow
def test_pools_grow_onto_a_joining_node_shrink_with_a_lost_one_and_grow_back(
    cpu_head: Cluster, tmp_path: Path, tiny_models: str
) -> None:
    """One 1-GPU worker at the start; a 2-GPU worker joins mid-run and decoders grow onto it; that worker dies
    (its batches run again elsewhere) and a new 1-GPU worker lets the pool grow back. Every image once.

    Decoder calls sleep ``PACE_S`` (a stand-in for GPU time: logical GPUs add no compute here) until the new
    worker's decoder has rendered; then the gate opens and the rest renders at full speed."""
    first = cpu_head.add_worker(num_cpus=2, num_gpus=1)
    # at 2 images per PACE_S per decoder until the gate opens: more than the phases take; 2 steps, as what is left
    # when the gate opens renders at full speed and costs the CPUs that the other tests of the suite share
    rows = rows_of(64, num_inference_steps=2)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    gate = tmp_path / "gate"
    gate.touch()
    job = Job(cpu_head, manifest, output, tiny_models, "--idle-timeout", "600",
              entry=("tests.helpers.gated_render", str(gate), str(PACE_S)))  # fmt: skip
    assert job.wait_for_markers(3), job.finish(10)[1][-3000:]  # a few batches: a rate before the join
    first_pids = cpu_head.pids(first)  # now: the job's actors are gone once it ends
    joined_at = time.time()
    second = cpu_head.add_worker(num_cpus=2, num_gpus=2)
    on = lambda node: lambda: {pid for _, pid in decoded(output)} & cpu_head.pids(node)  # noqa: E731
    assert wait_until(on(second), 240, job), job.finish(10)[1][-4000:]
    first_on_join = min(at for at, pid in decoded(output) if pid in cpu_head.pids(second))
    cpu_head.kill(second)
    third = cpu_head.add_worker(num_cpus=2, num_gpus=1)
    assert wait_until(on(third), 240, job), job.finish(10)[1][-4000:]
    gate.unlink()
    code, log = job.finish()
    assert code == 0, log[-4000:]
    assert "re-running" in log  # the lost node took calls with it (its decoders were busy): they ran again elsewhere
    check_once(output, rows)
    stats = json.loads((output / "stats.json").read_text())
    decoders = stats["stages"]["pools"]["decoder"]
    assert decoders["grown"] >= 1 and decoders["peak"] >= 2, decoders
    sizes = [size for _, size in decoders["history"]]
    low = sizes.index(min(sizes[sizes.index(max(sizes)) :]), sizes.index(max(sizes)))  # the fewest after the peak
    assert decoders["lost"] >= 1 and max(sizes[low:]) > sizes[low], decoders  # shrank with the node, grew back
    pids = {pid for _, pid in decoded(output)}
    assert pids & first_pids, "the first worker's decoder rendered"
    print(
        f"ELASTIC growth: node joined -> its first decoded image {first_on_join - joined_at:.1f} s; decoder pool "
        f"{decoders['history']}; lost 0, duplicated 0"
    )
