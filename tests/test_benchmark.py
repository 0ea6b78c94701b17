"""Every benchmark mode runs end to end at tiny sizes and prints its figures as JSON (no timing asserted)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.resources import StageLayout, StagePlacement, fit_cpus
from jobs.dev.real_size import build_real_size_modules
from tests.helpers.benchmarks import benchmark_in_process, last_json, run_benchmark


@pytest.fixture()
def in_process(capsys: pytest.CaptureFixture) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``kandinsky-render benchmark ARGS`` in this process (`benchmark_in_process`)."""
    yield from benchmark_in_process(capsys)


@pytest.mark.usefixtures("ray_two_gpus")
def test_heartbeat_prints_the_gaps_between_progress_lines(tmp_path: Path, in_process: Callable) -> None:
    """On the shared Ray (the mode starts one only when none is connected)."""
    code, out, err = in_process(
        "heartbeat", "--load-seconds", "1", "--progress-every", "1", "--rows", "2", "--work-dir", str(tmp_path)
    )
    assert code == 0, err[-3000:]
    result = last_json(out)
    assert result["images_ok"] == 2 and result["num_lines"] > result["num_phase_lines"] >= 8
    assert isinstance(result["max_gap_s"], float) and "stage decoder: 1 actor(s) up after" in out


def test_plan_and_startup_print_memory_and_time(tmp_path: Path) -> None:
    result = run_benchmark("plan", "--rows", "2000", "4000", "--files", "2", "--work-dir", str(tmp_path))
    assert [run["num_rows"] for run in result["runs"]] == [2000, 4000]
    assert "4000 row(s), 4 shard(s)" in result["runs"][1]["summary"][0]
    assert result["peak_rss_mb"] > 0 and result["seconds"] > 0 and result["rows_growth"] == 2
    startup = run_benchmark("startup", "--rows", "3000", "--files", "2", "--repeats", "1", "--work-dir", str(tmp_path))
    assert startup["num_images_final"] == 3000 and startup["num_pending"] == 0 and startup["num_shards"] == 4
    assert startup["ids_checked"] is False and startup["orphans_deleted"] == 0 and startup["seconds"] > 0


def test_host_times_the_decoder_around_a_stub_pipeline(tmp_path: Path, tiny_models: str, in_process: Callable) -> None:
    code, out, err = in_process(
        "host", "--models", tiny_models, "--size", "64", "--batch-size", "4", "--calls", "2",
        "--work-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err[-3000:]
    result = last_json(out)
    assert result["mode"] == "host" and result["path"] == "uint8 on the device" and result["machine"]["device"] == "cpu"
    assert (result["size"], result["batch_size"], result["calls"], result["threads"]) == (64, 4, 2, 1)
    for name in ("stage", "ipc", "device"):
        assert result[f"{name}_cpu_ms_per_image"] > 0 and result[f"{name}_wall_ms_per_image"] > 0
    # per call: the stage's CPU time, less its device-side part (on the CPU, standing in for a GPU), plus IPC
    assert 0 < result["host_ms_per_image"] < result["stage_cpu_ms_per_image"] + result["ipc_cpu_ms_per_image"]


def test_flop_count_of_the_real_architectures() -> None:
    """The limit the GPU figures are read against: 204 TFLOP per 768x768 image at 50 guided steps."""
    from jobs.dev.flops import flops_of
    from jobs.dev.real_size import real_size_configs

    flops = flops_of(real_size_configs(), height=768, width=768, steps=50, prior_steps=25)
    assert flops.unet_step / 1e12 == pytest.approx(3.985, abs=0.001)  # two 96x96 samples (guidance)
    assert flops.movq / 1e12 == pytest.approx(4.885, abs=0.001)
    assert flops.decoder / 1e12 == pytest.approx(204.1, abs=0.1) and flops.prior / 1e12 == pytest.approx(8.23, abs=0.01)


def test_score_dry_run_on_cpu_with_tiny_models(tmp_path: Path, tiny_models: str, in_process: Callable) -> None:
    code, out, err = in_process(
        "score", "--tiny", "--device", "cpu", "--models", tiny_models, "--size", "64", "--steps", "2",
        "--batch-size", "2", "--timed-batches", "2", "--threads", "1", "--work-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err[-3000:]
    result = last_json(out)
    assert result["mode"] == "score" and result["device"] == "cpu" and result["dtype"] == "float32"
    assert (result["size"], result["steps"], result["batch_size"], result["threads"]) == (64, 2, 2, 1)
    assert result["timed_images"] == result["scored"] == 4 and result["errors"] == 0
    assert len(result["decoder_call_seconds"]) == len(result["score_call_seconds"]) == 2
    assert result["decoder_seconds_per_image"] > 0 and result["score_seconds_per_image"] > 0
    ratio = result["score_seconds_per_image"] / result["decoder_seconds_per_image"]
    assert result["score_to_decoder_ratio"] == pytest.approx(ratio, rel=1e-3)
    parts = result["score_parts_seconds_per_image"]
    assert set(parts) == {"preprocess", "text_encoder", "image_encoder", "pixels_copy"}
    assert all(seconds >= 0 for seconds in parts.values())


@pytest.mark.parametrize("args", [(), ("--tiny",), ("--device", "cpu")])
def test_score_refuses_without_a_gpu_unless_tiny_on_cpu(args: tuple[str, ...], in_process: Callable) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = in_process("score", *args)
    assert code == 2
    assert "needs a CUDA device" in err and "--tiny --device cpu" in err


def test_real_size_architectures_have_the_documented_sizes() -> None:
    """The public checkpoints' sizes: UNet 1.253 B, MoVQ 68 M, prior 1.03 B, CLIP image 1.84 B, text 0.69 B."""
    modules = build_real_size_modules("meta")
    billions = {name: sum(p.numel() for p in m.parameters()) / 1e9 for name, m in modules.items()}
    assert billions["unet"] == pytest.approx(1.253, abs=0.001)
    assert billions["movq"] == pytest.approx(0.068, abs=0.001)
    assert billions["prior"] == pytest.approx(1.03, abs=0.01)
    assert billions["image_encoder"] == pytest.approx(1.84, abs=0.01)
    assert billions["text_encoder"] == pytest.approx(0.69, abs=0.01)


def test_cpu_reservations_fit_the_cluster() -> None:
    stages = [
        StageLayout(num_actors=1, num_gpus=0.0, num_cpus=1.0),
        StageLayout(num_actors=2, num_gpus=1.0, num_cpus=1.0),
    ]
    fitted = fit_cpus(stages, cluster_cpus=2)
    assert sum(s.num_actors * s.num_cpus for s in fitted) <= 2 and all(s.num_cpus > 0 for s in fitted)
    assert [s.num_gpus for s in fitted] == [0.0, 1.0]
    assert fit_cpus(stages, cluster_cpus=3) == stages
    placed = [StageLayout(num_actors=3, num_gpus=1.0, num_cpus=1.0, placement=StagePlacement(accelerator_type="L4"))]
    assert fit_cpus(placed, cluster_cpus=1)[0].placement.accelerator_type == "L4"  # only CPUs change


def test_help_lists_every_mode(in_process: Callable) -> None:
    code, out, _ = in_process("--help")
    assert code == 0
    for mode in (
        "cpu",
        "simulated",
        "ceiling",
        "efficiency",
        "objects",
        "layout",
        "plan",
        "startup",
        "log",
        "gpu",
        "host",
        "score",
        "heartbeat",
    ):
        assert mode in out
