"""Nothing lost: broken rows, failed writes, NaN models, hostile ids, reruns, increments, leases (killed drivers
and actors: tests/test_kills.py)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.storage import Storage
from jobs.job import run_job
from jobs.publishing.lease import Lease, LeaseHeldError
from jobs.reporting.results import read_results
from schemas.keys import LEASE_FILE
from schemas.results import final_results
from schemas.shards import image_key, shard_name
from tests.helpers.cli import Outcome, clean_env, in_process
from tests.helpers.places import REPO
from tests.helpers.reference import load_png, max_level_difference
from tests.helpers.rows import STEPS, config_for, raw_results, rows_of, write_manifest


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.usefixtures("ray_two_gpus")
def test_a_dozen_kinds_of_broken_rows_among_good_ones(tmp_path: Path, tiny_models: str) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(np.full((64, 64, 3), 120, np.uint8)))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 6000)).save(bomb)  # 48 MP of zeros: a tiny file, refused before decoding
    (tmp_path / "mask-small.png").write_bytes(_png(np.zeros((32, 32), np.uint8)))
    good = rows_of(5, "good") + [
        {"id": "good-i2i", "mode": "img2img", "prompt": "p", "image": str(photo), "strength": 0.7, "seed": 9, **STEPS}
    ]
    broken = {
        "no-prompt": ({"prompt": None}, "prompt is null or empty"),
        "too-big": ({"height": 4096}, "height=4096 is outside"),
        "too-many-images": ({"num_images": 99}, "num_images=99"),
        "negative-seed": ({"seed": -1}, "seed=-1"),
        "zero-steps": ({"num_inference_steps": 0}, "num_inference_steps=0"),
        "missing-input": ({"mode": "img2img", "image": str(tmp_path / "absent.png")}, "does not exist"),
        "corrupt-input": ({"mode": "img2img", "image": str(tmp_path / "corrupt.png")}, "not a decodable image"),
        "bomb-input": ({"mode": "img2img", "image": str(bomb)}, "above the limit"),
        "bad-protocol": ({"mode": "img2img", "image": "http://127.0.0.1:1/x.png"}, "protocol 'http'"),
        "odd-size": ({"height": 66}, "height=66 is not a multiple of 4"),
        "mask-mismatch": (
            {"mode": "inpaint", "image": str(photo), "mask": str(tmp_path / "mask-small.png")},
            "differs from its image",
        ),  # fmt: skip
        "no-denoising": ({"mode": "img2img", "image": str(photo), "strength": 0.2}, "strength < 1"),
        "nan-guidance": ({"guidance_scale": float("nan")}, "guidance_scale=nan"),
    }
    rows = good + [
        {"id": key, "prompt": "p", "seed": 1, "strength": 0.7, **STEPS, **row} for key, (row, _) in broken.items()
    ]
    random.Random(3).shuffle(rows)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    run_job(config_for(write_manifest(mixed / "m.parquet", rows), str(mixed / "out"), tiny_models, batch_size=3))
    clean = tmp_path / "clean"
    clean.mkdir()
    run_job(config_for(write_manifest(clean / "m.parquet", good), str(clean / "out"), tiny_models, batch_size=3))

    results = {r["id"]: r for r in final_results(read_results(Storage(str(mixed / "out")))).to_pylist()}
    reference = {r["id"]: r for r in final_results(read_results(Storage(str(clean / "out")))).to_pylist()}
    for key, (_, phrase) in broken.items():
        assert results[key]["status"] == "error" and phrase in results[key]["error"], (key, results[key]["error"])
    for row in good:
        assert results[row["id"]]["status"] == "ok"
        got, expected = load_png(results[row["id"]]["uri"]), load_png(reference[row["id"]]["uri"])
        assert max_level_difference(got, expected) <= 1
    stats = json.loads((mixed / "out" / "stats.json").read_text())
    kinds = stats["output"]["errors_by_kind"]
    assert kinds == {"invalid_row": 8, "input_error": 4, "unsupported_size": 1}, kinds


def test_failed_write_is_an_error_row_and_others_render(tmp_path: Path, tiny_models: str) -> None:
    rows = rows_of(6)
    output = tmp_path / "out"
    blocked = image_key(shard_name("m.parquet", 0, len(rows)), "r2", 0)  # where r2's PNG must go
    (output / blocked).mkdir(parents=True)  # a folder in the way
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    run_job(
        config_for(manifest, str(output), tiny_models, runner="local", allow_other_files=True)
    )  # the folder in the way
    results = {r["id"]: r for r in final_results(read_results(Storage(str(output)))).to_pylist()}
    assert results["r2"]["status"] == "error" and results["r2"]["error_kind"] == "write_failed"
    others = [r for key, r in results.items() if key != "r2"]
    assert len(others) == 5 and all(r["status"] == "ok" and Path(r["uri"]).is_file() for r in others)


@pytest.mark.usefixtures("ray_two_gpus")
def test_non_finite_model_output_is_an_error_row(tmp_path: Path, tiny_models: str) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    weights = next((models / "decoder" / "movq").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors = {name: t.fill_(float("nan")) if "conv_out" in name else t for name, t in tensors.items()}
    save_file(tensors, weights)
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(3))
    run_job(config_for(manifest, str(tmp_path / "out"), str(models)))
    results = final_results(read_results(Storage(str(tmp_path / "out")))).to_pylist()
    assert [r["error_kind"] for r in results] == ["non_finite_output"] * 3
    assert not list((tmp_path / "out").glob("images/**/*.png"))


@pytest.mark.usefixtures("ray_two_gpus")
def test_hostile_ids_never_write_outside_the_output(tmp_path: Path, tiny_models: str) -> None:
    hostile = ["../../escape", "/etc/passwd", "a\x00b", "tab\tnew\nline\r", "x" * 3000, "..", ".", "a/b", "a_b",
               "a b", "ünï/../../cødé", "C:\\windows\\system32", "~root", "$HOME", "%2e%2e%2f"]  # fmt: skip
    rows = [{"id": row_id, "prompt": "p", "seed": i, **STEPS} for i, row_id in enumerate(hostile)]
    work = tmp_path / "work"
    work.mkdir()
    manifest = write_manifest(work / "m.parquet", rows)
    before = {p for p in Path("/tmp").glob("*")} | {p for p in tmp_path.rglob("*")}
    output = work / "out"
    run_job(config_for(manifest, str(output), tiny_models))
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p == output or output in p.parents for p in created if p != work / "m.parquet")
    assert not (Path("/tmp") / "escape").exists() and not Path("/etc/passwd.png").exists()
    results = final_results(read_results(Storage(str(output)))).to_pylist()
    assert sorted(r["id"] for r in results) == sorted(hostile) and all(r["status"] == "ok" for r in results)
    uris = [r["uri"] for r in results]
    assert len(set(uris)) == len(uris)
    assert all(Path(u).resolve().is_relative_to((output / "images").resolve()) for u in uris)


def test_lease_blocks_a_second_run_and_is_taken_over_when_stale(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "out"
    storage = Storage(str(output))
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    config = config_for(manifest, str(output), tiny_models, runner="local")
    holder = Lease(storage, run_id="someone-else", ttl_s=60)
    holder.acquire()
    try:
        with pytest.raises(LeaseHeldError, match="someone-else"):
            run_job(config)
        busy = in_process(capsys, "render", "--manifest", manifest, "--output", str(output), "--models", tiny_models,
                          "--runner", "local")  # fmt: skip
        assert busy.code == 75 and "another run is rendering" in busy.err
        assert not (output / "results").exists()
        threading.Timer(1.5, holder.release).start()
        waited = run_job(config_for(manifest, str(output), tiny_models, runner="local", lease_wait_s=60))
        assert waited.stats["num_rendered"] == 2
    finally:
        holder.release()

    # A lease left by a dead process on this host, or an expired one from elsewhere, is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for record in (
        {"run_id": "crashed", "host": os.uname().nodename, "pid": int(dead.stdout), "expires_at": time.time() + 600},
        {"run_id": "expired", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1},
    ):
        storage.write_bytes(LEASE_FILE, json.dumps(record).encode())
        summary = run_job(config_for(manifest, str(output), tiny_models, runner="local", overwrite=True))
        assert summary.stats["num_rendered"] == 2 and not (output / LEASE_FILE).exists()


def test_retry_errors_overwrite_and_exit_status_policy(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    photo = tmp_path / "late.png"
    rows = rows_of(2) + [{"id": "late-input", "mode": "img2img", "prompt": "p", "image": str(photo), "seed": 1,
                          "strength": 0.7, **STEPS}]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = str(tmp_path / "out")
    base = ["render", "--manifest", manifest, "--output", output, "--models", tiny_models, "--runner", "local"]

    def cli(*extra: str) -> Outcome:
        return in_process(capsys, *base, *extra)

    strict = cli("--max-error-fraction", "0.2")
    assert strict.code == 3 and "above --max-error-fraction" in strict.err
    assert (tmp_path / "out" / "_SUCCESS").exists()  # the run completed; the policy decides the status

    photo.write_bytes(_png(np.full((64, 64, 3), 200, np.uint8)))
    assert cli().code == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["num_rendered"] == 0  # error rows are final unless --retry-errors
    assert cli("--retry-errors").code == 0
    final = {r["id"]: r for r in final_results(read_results(Storage(output))).to_pylist()}
    assert final["late-input"]["status"] == "ok"
    assert len(raw_results(output)) == 4  # 3 first results + the retried one; earlier rows kept

    assert cli("--overwrite").code == 0
    results = raw_results(output)
    assert len(results) == 3 and len({r["run_id"] for r in results}) == 1
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 3


def test_retry_errors_writes_nothing_for_a_refusal_it_would_repeat(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    rows = rows_of(1) + [{"id": "odd", "prompt": "p", "seed": 1, **STEPS, "height": 66}]
    output = tmp_path / "out"
    base = ["render", "--manifest", write_manifest(tmp_path / "m.parquet", rows), "--output", str(output),
            "--models", tiny_models, "--runner", "local"]  # fmt: skip
    assert in_process(capsys, *base).code == 0
    before = sorted(p.relative_to(output) for p in output.rglob("*") if p.parts[-2] in ("results", "shards"))
    for _ in range(2):  # the same unsupported_size again: no new part, no marker rewritten
        assert in_process(capsys, *base, "--retry-errors").code == 0
        after = sorted(p.relative_to(output) for p in output.rglob("*") if p.parts[-2] in ("results", "shards"))
        assert after == before
    assert [r["error_kind"] for r in raw_results(str(output)) if r["id"] == "odd"] == ["unsupported_size"]


def test_a_rerun_with_nothing_pending_stops_before_starting_ray(
    tmp_path: Path, tiny_models: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every shard done: the rerun (a Ray run) reads footers and markers, says so, rewrites the report from the
    markers and ends without starting Ray or any actor (before: Ray and the writers started, then stopped)."""
    import dataclasses
    import logging

    config = config_for(write_manifest(tmp_path / "m.parquet", rows_of(2)), str(tmp_path / "out"), tiny_models)
    first = run_job(dataclasses.replace(config, runner="local"))
    with caplog.at_level(logging.INFO, logger="kandinsky_render.jobs.job"):
        again = run_job(config)
    assert "nothing to render: all 1 shard(s)" in caplog.text and "Ray not started" in caplog.text
    assert "ray_connected" not in again.stats["timeline"] and not again.stats["stages"]["runner"].startswith("ray")
    assert again.stats["num_skipped_already_final"] == 2 and again.stats["output"]["by_status"] == {"ok": 2}
    assert (tmp_path / "out" / "_SUCCESS").read_text().strip() == again.run_id != first.run_id
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["run_id"] == again.run_id

    # A shell that runs something first and then execs the command keeps its process (and its start time):
    # the summary's times count from the command's own start, not the shell's (before: 6 s more).
    line = f"sleep 3 && exec {sys.executable} -m jobs.render --manifest {config.manifest} --output {config.output}"
    shell = subprocess.run(["bash", "-c", line], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert shell.returncode == 0, shell.stderr[-2000:]
    timeline = json.loads((tmp_path / "out" / "stats.json").read_text())["timeline"]
    assert timeline["run_started"] < 3 and timeline["gallery_written"] < 3, timeline
