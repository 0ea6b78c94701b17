"""The benchmarks that run the whole job in processes of their own (a private Ray each): the simulated wiring,
objects per format, the completion log's request counts, the CPU job against a diffusers loop and a Ray Data peer.
A module of their own so that a parallel test run can take them beside the rest of tests/test_benchmark.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.benchmarks import run_benchmark

pytestmark = [pytest.mark.slow]  # each starts processes and a private Ray of its own


def test_simulated_runs_the_whole_job_and_prints_efficiency_json(tmp_path: Path) -> None:
    result = run_benchmark(
        "simulated", "--num-decoders", "2", "--rows", "24", "--prior-ms", "2", "--decoder-ms", "10",
        "--shard-rows", "8", "--work-dir", str(tmp_path),
    )  # fmt: skip
    for key in ("images_per_s", "ideal_images_per_s", "efficiency", "decoder_busy", "first_image_s"):
        assert isinstance(result[key], float), key
    assert result["ideal_images_per_s"] == pytest.approx(200.0)
    assert result["rows"] == 24 and result["num_decoders"] == 2 and len(result["runs"]) == 1
    assert 0 < result["efficiency"] <= 1.05
    assert result["num_shards"] == 3 and result["objects_per_shard"] == 3  # webdataset: tar, results, marker


def test_objects_per_format(tmp_path: Path) -> None:
    result = run_benchmark("objects", "--rows", "8", "--shard-rows", "4", "--work-dir", str(tmp_path))
    formats = result["formats"]
    assert formats["webdataset"]["objects_per_shard"] == formats["parquet"]["objects_per_shard"] == 3
    assert formats["files"]["objects_per_shard"] == 7  # 4 PNGs, their metadata.parquet, results, marker


def test_log_counts_requests_and_measures_reruns_over_done_shards(tmp_path: Path) -> None:
    result = run_benchmark(
        "log", "--done", "6", "--new", "2", "--local-shards", "3000", "--s3-shards", "400", "--files", "2",
        "--compact-every", "1000", "--work-dir", str(tmp_path), timeout=600,
    )  # fmt: skip
    requests = result["requests"]
    assert requests["rerun"]["result"] == 2 and requests["noop_rerun"]["result"] == 0
    assert requests["status"]["result"] == requests["status_verify"]["result"] == 8
    assert requests["status"]["GET"] < requests["status_verify"]["GET"]  # --verify reads every marker
    for case, shards in (("local", 3000), ("s3", 400)):
        found = result[case]
        assert found["written"] == shards and found["rerun"]["summary"] == f"{shards:,} shards, 0 rendered"
        assert found["status"]["summary"] == f"{shards:,} shards done, {shards:,} images"
    assert result["s3"]["status"]["requests"]["total"] > 0 and result["local"]["rerun"]["peak_rss_mb"] > 0


def test_cpu_runs_job_loop_and_ray_data_peer_with_equal_images(tmp_path: Path) -> None:
    result = run_benchmark(
        "cpu", "--rows", "4", "--size", "64", "--steps", "2", "--work-dir", str(tmp_path),
        "--render-args", "--batch-size 2 --log-level WARNING",
    )  # fmt: skip
    assert result["ours_seconds"] > 0 and result["diffusers_loop_seconds"] > 0 and result["ray_data_peer_seconds"] > 0
    assert result["ratio"] == pytest.approx(result["ours_seconds"] / result["diffusers_loop_seconds"], rel=1e-3)
    assert result["ratio_vs_peer"] == pytest.approx(result["ours_seconds"] / result["ray_data_peer_seconds"], rel=1e-3)
    assert result["max_level_difference"] <= 1
    assert len(list((tmp_path / "peer").glob("*.png"))) == 4  # the peer script saved every row's image
    timeline = result["timeline"]
    assert (
        0 < timeline["first_dispatch"] <= timeline["rendered"] and 0 < result["fixed_seconds"] < result["ours_seconds"]
    )
    chosen = {choice["flag"]: choice["value"] for choice in result["defaults_chosen"]}
    assert chosen["--prior-batch-size"] == 4 and "--batch-size" not in chosen  # the machine's default; the flag's
    stats = json.loads((tmp_path / "ours" / "stats.json").read_text())
    calls = stats["stages"]["calls"]  # one prior call served both decoder batches; one add each, one finalize
    assert calls == {"prior": 1, "decoder": 2, "writer": 3}
    assert stats["suggested_stages"]["decoder_seconds_per_image"] > 0  # measured; on CPU there is nothing to split
