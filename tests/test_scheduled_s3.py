"""Scheduled-style runs on a real S3 endpoint (moto on loopback): a growing manifest prefix, each row rendered once,
credentials kept out of everything the job prints or writes, and a gallery that opens from the bucket.

These runs use the local runner; the same on Ray (an S3 prefix and output, a rerun rendering only what the first run
left, each image once) is `tests/test_kills.py::test_driver_sigkill_at_a_random_moment_then_rerun_on_s3`, and a
no-op rerun on S3 is `benchmark log`'s (`tests/test_benchmark_jobs.py`)."""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers.cli import Outcome, clean_env, command, in_process, run
from tests.helpers.places import REPO
from tests.helpers.rows import write_manifest

KEY = "AKIAKANDINSKYTEST0001"
SECRET = "kandinsky-Secret-Do-Not-Print-42"


def day_rows(day: int, ids: list[str]) -> list[dict]:
    return [
        {
            "id": f"day{day}/{row_id}",
            "prompt": f"{row_id} on day {day}",
            "height": 64,
            "width": 64,
            "seed": day * 100 + n,
            "num_images": 2 if n == 0 else 1,
            "num_inference_steps": 3,
            "prior_num_inference_steps": 3,
        }
        for n, row_id in enumerate(ids)
    ]


class ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")


@pytest.mark.slow
def test_two_scheduled_runs_over_a_growing_prefix_render_every_row_once(
    tmp_path: Path, tiny_models: str, s3_endpoint: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run and the dry run in this process, the second as the schedule starts it (a process of its own,
    whose stderr carries the JSON log lines)."""
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    bucket = f"nightly-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    prefix, output = f"s3://{bucket}/manifests/", f"s3://{bucket}/renders/nightly"
    # The schedule's job file: everything but the credentials, which come from the environment.
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {
                "manifest": prefix,
                "output": output,
                "models": tiny_models,
                "runner": "local",
                "storage-endpoint-url": s3_endpoint,
                "storage-region": "us-east-1",
                "log-format": "json",
            }
        )
    )
    environment = {
        "HF_HUB_OFFLINE": "1",
        "KANDINSKY_RENDER_STORAGE_OPTIONS": json.dumps({"key": KEY, "secret": SECRET}),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    def here(*extra: str) -> Outcome:
        outcome = in_process(capsys, "render", "--config", str(job_file), *extra)
        assert outcome.code == 0, outcome.err[-3000:]
        return outcome

    day1, day2 = day_rows(1, ["fox", "owl", "elk"]), day_rows(2, ["cat", "bee"])
    fs.put(write_manifest(tmp_path / "d1.parquet", day1), f"{bucket}/manifests/day=1/part-0.parquet")
    first = here()
    fs.put(write_manifest(tmp_path / "d2.parquet", day2), f"{bucket}/manifests/day=2/part-0.parquet")
    plan = here("--dry-run")
    assert "1 shard(s) done, 4 image(s) already final; 1 shard(s) to render" in plan.out
    assert " to render " in plan.out and plan.out.count("\n  text2img") == 1
    second = run("--config", str(job_file), module="jobs.render", env=environment)
    assert second.returncode == 0, second.stderr[-3000:]

    # Every (id, image_index) has exactly one results row across both runs' parts: nothing rendered twice.
    parts = fs.glob(f"{bucket}/renders/nightly/results/*.parquet")
    rows = [row for part in parts for row in pq.read_table(io.BytesIO(fs.cat_file(part))).to_pylist()]
    counts = Counter((row["id"], row["image_index"]) for row in rows)
    expected = {(row["id"], k) for row in day1 + day2 for k in range(row["num_images"])}
    assert set(counts) == expected and set(counts.values()) == {1}
    assert all(row["status"] == "ok" for row in rows)
    runs = {row["id"].split("/")[0]: set() for row in rows}
    for row in rows:
        runs[row["id"].split("/")[0]].add(row["run_id"])
    assert len(runs["day1"]) == 1 and len(runs["day2"]) == 1 and runs["day1"] != runs["day2"]

    stats = json.loads(fs.cat_file(f"{bucket}/renders/nightly/stats.json"))
    assert stats["num_rendered"] == 3 and stats["num_skipped_already_final"] == 4
    assert stats["this_run"]["by_status"] == {"ok": 3} and stats["output"]["by_status"] == {"ok": 7}

    # Structured progress lines for cluster logs (stderr, one JSON object per line).
    records = [json.loads(line) for line in second.stderr.splitlines() if line.startswith("{")]
    finished = [r["progress"] for r in records if r.get("progress", {}).get("phase") == "finished"]
    assert finished and finished[-1]["num_done"] == 3 and finished[-1]["num_images"] == 3

    # The gallery opens from the bucket: served as HTML, every image referenced relative to it exists.
    gallery = f"{bucket}/renders/nightly/index.html"
    assert fs.info(gallery)["ContentType"].startswith("text/html")
    assert fs.info(f"{bucket}/renders/nightly/contact_sheet.png")["ContentType"] == "image/png"
    page = ImageSources()
    page.feed(fs.cat_file(gallery).decode())
    assert len(page.sources) == 7
    for source in page.sources:
        assert not source.startswith(("/", "s3:", "http")) and fs.exists(f"{bucket}/renders/nightly/{source}")

    # Credentials appear nowhere: not in what the runs printed, nor in any object they wrote.
    for shown in (first.out + first.err, plan.out + plan.err, second.stdout + second.stderr):
        assert KEY not in shown and SECRET not in shown
    for path in fs.find(f"{bucket}/renders"):
        data = fs.cat_file(path)
        assert KEY.encode() not in data and SECRET.encode() not in data, path
    assert stats["config"]["storage_options"]["secret"] == "<redacted>"


def test_errors_never_print_credentials(tmp_path: Path, s3_endpoint: str) -> None:
    """A refused job (here: a manifest prefix that does not exist) names the problem, not the secret."""
    env = clean_env()
    env["KANDINSKY_RENDER_STORAGE_OPTIONS"] = json.dumps({"key": KEY, "secret": SECRET})
    proc = subprocess.run(
        [*command(module="jobs.render"), "--manifest", f"s3://no-such-bucket-{SECRET}/m/"]
        + ["--output", str(tmp_path / "out"), "--storage-endpoint-url", s3_endpoint, "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "manifest refused" in proc.stderr and "no-such-bucket-<redacted>" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr and KEY not in proc.stdout + proc.stderr
