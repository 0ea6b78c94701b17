"""A killed actor whose restart takes long on a loaded machine, and a frozen one: the job finishes, each image once."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobs.execution import chain
from jobs.job import JobSummary, run_job
from tests.helpers.fault_timing import baseline, report
from tests.helpers.rows import MARKERS, assert_exactly_one_ok, config_for, raw_results, rows_of, write_manifest
from tests.helpers.slow_stages import SlowRestartDecoder, starts, with_decoder

pytestmark = [pytest.mark.fault]


@pytest.fixture()
def cpu_hog() -> Iterator[subprocess.Popen]:
    """A process spinning one core for the whole test, stopped by its pid at the end. At the lowest priority: it
    takes every cycle the machine leaves idle (alone, the test's processes share the cores with it), not the
    cycles of what runs beside the test in the suite."""
    hog = subprocess.Popen([sys.executable, "-c", "import os; os.nice(19)\nwhile True: pass"])
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait(timeout=30)


def in_thread(config: Any) -> tuple[threading.Thread, dict]:
    """``run_job(config)`` running in a thread; the dict receives ``summary`` or ``error``."""
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["summary"] = run_job(config)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=job, name="job")
    thread.start()
    return thread, outcome


def wait_for(condition: Any, *, timeout: float, thread: threading.Thread) -> Any:
    """Poll ``condition()`` until it returns something truthy; None if the job ended or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    return None


def markers_ok(output: Path) -> int:
    """ok images the output's shard markers count."""
    import json

    return sum(json.loads(p.read_text())["by_status"].get("ok", 0) for p in output.glob(MARKERS))


def check_every_image_once(summary: JobSummary, output: Path, rows: list[dict]) -> None:
    results = raw_results(str(output))
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == len(rows)  # no error rows, no duplicate rows
    assert markers_ok(output) == len(rows) and summary.stats["output"]["by_status"] == {"ok": len(rows)}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_two_gpus")
def test_the_only_decoder_killed_on_a_loaded_machine_with_a_slow_restart(
    tmp_path: Path, tiny_models: str, cpu_hog: subprocess.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of the job's one decoder actor while a CPU hog loads the machine; its restart sleeps 10 s first
    (a model reload on a busy node): the driver waits for it, re-runs the lost batches, and nothing is lost."""
    starts_file = str(tmp_path / "decoder-starts")
    slow_restarts = with_decoder(chain.build_chain, SlowRestartDecoder, starts_file=starts_file, restart_delay_s=10.0)
    monkeypatch.setattr(chain, "build_chain", slow_restarts)
    rows = rows_of(8, num_inference_steps=4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    config = config_for(manifest, str(output), tiny_models, batch_size=2, shard_rows=2)
    started = time.monotonic()
    job, outcome = in_thread(config)
    first = wait_for(lambda: list(output.glob(MARKERS)) and starts(starts_file), timeout=240, thread=job)
    assert first, outcome.get("error") or "no shard finished while the decoder was up"
    killed_at = time.monotonic()
    os.kill(first[0], signal.SIGKILL)
    job.join(timeout=400)
    seconds = time.monotonic() - started
    assert not job.is_alive() and "error" not in outcome, outcome.get("error")
    pids = starts(starts_file)
    after = time.monotonic() - killed_at
    report("decoder-sigkill-slow-restart", seconds, f"({after:.1f} s after the kill, a CPU hog beside it)")
    assert len(pids) == 2 and pids[0] == first[0] and pids[1] != pids[0]  # killed once, restarted once
    check_every_image_once(outcome["summary"], output, rows)
    assert after > 10  # the job did wait for the slow restart
    os.remove(starts_file)  # the clean run's decoder starts once: no slow restart
    clean = dataclasses.replace(config, output=str(tmp_path / "clean"))
    baseline("decoder-sigkill-slow-restart", lambda: run_job(clean))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_two_gpus")
def test_a_frozen_decoder_is_killed_at_its_deadline_and_its_work_rerun(
    tmp_path: Path, tiny_models: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP of the decoder actor mid-run, after its first calls: with the default deadlines (no --call-timeout,
    the 600 s floor for first calls) its call is past its deadline once it runs 5 x the stage's slowest call, at
    least --call-timeout-warm-floor; the driver kills it, Ray restarts it, and its batches run again."""
    rows = rows_of(12, num_inference_steps=6)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    config = config_for(manifest, str(output), tiny_models, batch_size=2, shard_rows=2, call_timeout_warm_floor_s=5.0)
    assert config.call_timeout_s is None and config.call_timeout_floor_s == 600
    caplog.set_level(logging.WARNING, logger="kandinsky_render.jobs.execution.runner")
    started = time.monotonic()
    job, outcome = in_thread(config)
    frozen = None
    try:
        worker = wait_for(lambda: _decoder_pid(output), timeout=240, thread=job)
        assert worker, outcome.get("error") or "no decoder seen at work"
        frozen = psutil.Process(worker)
        frozen.suspend()  # SIGSTOP
        stopped_at = time.monotonic()
        job.join(timeout=300)
    finally:
        if frozen is not None and frozen.is_running():  # nothing frozen is left behind
            frozen.resume()
            frozen.kill()
    seconds = time.monotonic() - started
    assert not job.is_alive() and "error" not in outcome, outcome.get("error")
    report("decoder-sigstop", seconds, f"({time.monotonic() - stopped_at:.1f} s after the freeze)")
    deadlines = [
        float(d) for d in re.findall(r"stage decoder: a call has run \d+ s, past its deadline of (\d+) s", caplog.text)
    ]
    assert deadlines and max(deadlines) < 300, caplog.text  # not the 600 s floor of first calls
    check_every_image_once(outcome["summary"], output, rows)
    assert worker not in {int(r["decoder_worker"].split(":")[1].split()[0]) for r in raw_results(str(output))[-2:]}
    baseline("decoder-sigstop", lambda: run_job(dataclasses.replace(config, output=str(tmp_path / "clean"))))


def test_call_deadlines_are_long_for_first_calls_and_follow_measured_times_after() -> None:
    """Unit view of the watchdog's deadlines: a model actor's first call (load, compile) gets the long floor;
    once it has finished a call, 5 x the stage's slowest call, at least the warm floor; a restart (a failure, a
    probe it has not answered yet) makes it cold again; writer calls keep the long floor; --call-timeout wins."""
    from jobs.execution.contract import SinkSpec, StageSpec
    from jobs.execution.pool import Actor
    from jobs.execution.watchdog import Deadlines, Watchdog

    stage, sink = StageSpec(name="decoder", cls=object), SinkSpec(name="writer", cls=object)
    deadlines = Deadlines(call_timeout_floor_s=600, call_timeout_warm_floor_s=60)
    watchdog = Watchdog([stage, sink], deadlines, started=time.monotonic(), stall_warning_s=120)
    decoder, writer = Actor(pool=0, handle=None, ready=True), Actor(pool=1, handle=None, ready=True)
    assert watchdog.deadline(0, decoder) == 600  # first call
    decoder.last_done = writer.last_done = time.monotonic()  # each finished a call ...
    watchdog.finished_call(0, 4.0)
    watchdog.finished_call(1, 2.0)
    assert watchdog.deadline(0, decoder) == 60 and watchdog.deadline(1, writer) == 600
    watchdog.finished_call(0, 30.0)
    assert watchdog.deadline(0, decoder) == 150  # 5 x the slowest call
    decoder.failures += 1  # its call failed: it died (or was killed) and restarts
    assert watchdog.deadline(0, decoder) == 600
    decoder.last_done = time.monotonic() + 1
    assert watchdog.deadline(0, decoder) == 150
    decoder.ready = False  # waiting for its probe: a restart
    assert watchdog.deadline(0, decoder) == 600
    explicit = Watchdog([stage, sink], Deadlines(call_timeout_s=10), started=0.0, stall_warning_s=120)
    assert explicit.deadline(0, decoder) == explicit.deadline(1, writer) == 10


def _decoder_pid(output: Path) -> int | None:
    """The pid of the decoder that rendered the first published shard ("host:pid ..." in its results rows)."""
    import pyarrow.parquet as pq

    parts = sorted((output / "results").glob("*.parquet")) if output.exists() else []
    if not parts:
        return None
    worker = pq.read_table(parts[0], columns=["decoder_worker"]).column(0)[0].as_py()
    return int(worker.split(":")[1].split()[0])


@pytest.mark.usefixtures("ray_two_gpus")
def test_a_sink_that_was_only_unreachable_drops_what_it_held_of_a_task_run_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer to one of the sink's ``add`` calls is lost (Ray: ActorUnavailableError, "the task may or may not
    have been executed") although the sink lives on with that batch: its task runs again, and the sink, told to
    drop what it held of it first, ends with each row once."""
    import ray

    from jobs.execution.local import run_local
    from jobs.execution.runner import RayStagePipeline, run_ray
    from jobs.planning.batches import batch
    from tests.helpers.runners import (
        MIXED,
        task_ids,
        task_rows,
        toy_sink,
        toy_stages,
        toy_tasks,
        work_rows,
    )

    batches = list(batch(work_rows(MIXED), batch_size=2))
    expected = task_ids(task_rows(list(run_local(toy_stages(), toy_sink(), toy_tasks(batches, max_rows=4)))))
    complete, lost = RayStagePipeline._complete, []

    def answer_lost_once(self: RayStagePipeline, ref: Any) -> Iterator[Any]:
        call = self.calls[ref]
        if call.kind == "add" and not lost:
            lost.append(ref)
            ray.get(ref)  # the sink did add the batch ...
            del self.calls[ref]  # ... but its answer never arrives
            call.actor.inflight -= 1
            call.actor.submitted.popleft()
            self._failed(call, ray.exceptions.ActorUnavailableError("RPC error: Socket closed", None))
            return
        yield from complete(self, ref)

    monkeypatch.setattr(RayStagePipeline, "_complete", answer_lost_once)
    got = task_ids(task_rows(list(run_ray(toy_stages(), toy_sink(), toy_tasks(batches, max_rows=4)))))
    assert lost and got == expected  # no row twice
