"""Progress: a live line on terminals, structured log lines elsewhere, and the end-of-run summary table."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from jobs.execution import chain
from jobs.job import run_job
from jobs.reporting.progress import JsonFormatter, Progress, summary_table
from schemas.config import JobConfig
from schemas.models import ModelPaths
from schemas.resources import StageResources
from tests.helpers.rows import write_manifest
from tests.helpers.slow_stages import SlowLoadDecoder, with_decoder

STEPS = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "height": 64, "width": 64}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def results(*statuses: str) -> dict[str, int]:
    """What the job tells Progress about one batch: images done, errors among them."""
    return {"num_done": len(statuses), "num_errors": sum(status != "ok" for status in statuses)}


def progress_records(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [record.progress for record in caplog.records if hasattr(record, "progress")]


def test_not_a_terminal_stays_quiet_and_logs_structured_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream=stream, log_every_s=30.0, clock=clock)
    assert progress.live is False
    with caplog.at_level(logging.INFO, logger="kandinsky_render.progress"):
        progress.start(run_id="r1", num_images=10)
        progress.update(**results("error"))  # a refused row
        clock.now += 10
        progress.update(**results("ok"))  # 10 s after start: no line yet
        clock.now += 25
        progress.update(**results("ok", "error", "ok", "ok"))  # 35 s: a line
        clock.now += 5
        progress.update(**results("ok", "ok", "ok", "ok"))
        progress.finish()
    assert stream.getvalue() == ""
    phases = [(r["phase"], r["num_done"]) for r in progress_records(caplog)]
    assert phases == [("started", 0), ("running", 6), ("finished", 10)]
    running = progress_records(caplog)[1]
    assert running["num_images"] == 10 and running["num_errors"] == 2  # 1 refused row + 1 failed image
    assert running["images_per_s"] == pytest.approx(6 / 35, abs=1e-3)
    assert running["eta_s"] == pytest.approx(4 / (6 / 35), abs=0.1)
    assert "6/10 images (60%)" in caplog.records[1].getMessage()


def test_terminal_gets_a_live_line_and_no_periodic_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    terminal, clock = Terminal(), FakeClock()
    progress = Progress(stream=terminal, clock=clock, log_every_s=1.0)
    assert progress.live is True
    with caplog.at_level(logging.INFO, logger="kandinsky_render.progress"):
        progress.start(run_id="r2", num_images=4)
        clock.now += 2
        progress.update(**results("ok", "error"))
        clock.now += 2
        progress.update(**results("ok", "ok"))
        progress.finish()
    screen = terminal.getvalue()
    assert screen.count("\r") >= 3 and screen.endswith("\n")
    assert "2/4 images (50%)  1.00 images/s  ETA 0:00:02  1 error(s)" in screen
    assert "4/4 images (100%)" in screen.rsplit("\r", 1)[-1]
    assert [r["phase"] for r in progress_records(caplog)] == ["started", "finished"]


def test_nothing_to_render_finishes_at_100_percent() -> None:
    progress = Progress(stream=io.StringIO(), clock=FakeClock())
    progress.start(run_id="r3", num_images=0)
    progress.finish()
    assert progress.line().startswith("0/0 images (100%)") and progress.snapshot()["eta_s"] == 0.0


def test_json_log_lines_carry_progress_fields() -> None:
    record = logging.LogRecord("kandinsky_render.progress", logging.INFO, __file__, 1, "running: %s", ("x",), None)
    record.progress = {"phase": "running", "num_done": 3, "num_images": 8}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "running: x" and entry["level"] == "INFO"
    assert entry["progress"] == {"phase": "running", "num_done": 3, "num_images": 8}
    assert entry["time"].endswith("+00:00")


def test_summary_table_compares_this_run_with_the_output() -> None:
    stats = {
        "run_id": "20261127T000000Z-abc",
        "this_run": {
            "by_status": {"ok": 3, "error": 1},
            "by_mode": {"text2img": {"ok": 3, "error": 1}},
            "errors_by_kind": {"invalid_row": 1},
        },
        "output": {
            "by_status": {"ok": 10, "error": 1},
            "by_mode": {"text2img": {"ok": 10, "error": 1}},
            "errors_by_kind": {"invalid_row": 1},
        },
        "num_skipped_already_final": 7,
        "images_per_s": 1.25,
        "busy_seconds": {"prior": 0.5, "decoder": 2.5},
        "wall_seconds": 4.0,
    }
    table = summary_table(stats)
    lines = {line.strip().split("  ")[0]: line for line in table.splitlines()[1:]}
    assert lines["images ok"].split()[-2:] == ["3", "10"]
    assert lines["error invalid_row"].split()[-2:] == ["1", "1"]
    assert "error 1 ok 3" in lines["text2img"]
    assert lines["busy seconds decoder"].split()[-1] == "2.5"
    assert lines["skipped (already final)"].split()[-1] == "7"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_two_gpus")
def test_log_mode_says_what_happens_at_least_every_interval_through_a_slow_model_load(
    tmp_path: Path, tiny_models: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoder whose model takes 8 s to load, --progress-every 1: before, nothing was logged until an image
    finished; now phase lines (each stage up, the first image, publishing) and a heartbeat saying
    what the job waits for come at least every interval (plus this loaded machine's scheduling slack)."""
    monkeypatch.setattr(chain, "build_chain", with_decoder(chain.build_chain, SlowLoadDecoder, load_delay_s=8.0))
    rows = [{"id": f"r{i}", "prompt": f"picture {i}", "seed": i, **STEPS} for i in range(2)]
    config = JobConfig(
        manifest=write_manifest(tmp_path / "m.parquet", rows),
        output=str(tmp_path / "out"),
        models=ModelPaths.resolve(models_dir=tiny_models),
        decoder=StageResources(num_actors=1, num_gpus=1),
    )
    with caplog.at_level(logging.INFO, logger="kandinsky_render.progress"):
        summary = run_job(config, progress=Progress(live=False, log_every_s=1.0))
    assert summary.stats["output"]["by_status"] == {"ok": 2}
    records = [record for record in caplog.records if hasattr(record, "progress")]
    gaps = [later.created - earlier.created for earlier, later in zip(records, records[1:])]
    assert max(gaps) < 1.0 + 2.0, f"a {max(gaps):.1f} s gap between lines"
    events = [record.progress["event"] for record in records if record.progress["phase"] == "phase"]
    for expected in ("planning", "stage decoder: 1 actor(s) up after", "first image stored"):
        assert any(event.startswith(expected) for event in events), (expected, events)
    assert any(event.startswith("every shard published; writing the gallery") for event in events)
    waiting = [r.progress.get("status", "") for r in records if r.progress["phase"] == "running"]
    assert any("decoder 0/1 up" in status for status in waiting), waiting  # the heartbeat says what it waits for
    assert all(record.progress["since_start_s"] >= 0 for record in records)
