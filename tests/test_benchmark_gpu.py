"""``benchmark gpu`` on the CPU with the tiny models: its phase order, one JSON line per phase, its budget (a fake
clock), a failing phase, its scratch folder, its refusal without CUDA and the peak it reads (no timing asserted)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.benchmarks import benchmark_in_process

PHASES = [
    "models", "eager", "combined", "prior", "compiled", "compiled_channels_last", "channels_last", "equality",
    "eager_batch_1", "co_located",
]  # fmt: skip
# The smallest run of every phase: 32x32, 2 steps, batch 2 (batch 1 for the late small-batch phase), float32.
SMALL = (
    "--tiny", "--device", "cpu", "--dtype", "float32", "--size", "32", "--steps", "2", "--prior-steps", "2",
    "--batch-size", "2", "--small-batches", "1", "--timed-batches", "1", "--combined-rows", "1", "--check-rows", "1",
    "--check-steps", "2", "--colocated-calls", "1", "--threads", "1",
)  # fmt: skip


@pytest.fixture()
def in_process(capsys: pytest.CaptureFixture) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``kandinsky-render benchmark gpu ARGS`` in this process (`benchmark_in_process`)."""
    yield from benchmark_in_process(capsys, "gpu")


def json_lines(out: str) -> list[dict]:
    """Every JSON line the run printed: one per phase, then the summary."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def phases_of(out: str) -> tuple[dict[str, dict], dict]:
    """(phase name -> its JSON line, the summary), checked to come in `PHASES` order, the summary last."""
    lines = json_lines(out)
    assert [line["phase"] for line in lines] == [*PHASES, "summary"]
    assert [line["index"] for line in lines[:-1]] == list(range(len(PHASES)))
    summary = lines[-1]
    assert summary["phases"] == [[line["phase"], line["status"]] for line in lines[:-1]]
    return {line["phase"]: line for line in lines[:-1]}, summary


def test_dry_run_prints_every_phase_in_order_and_removes_its_scratch(tiny_models: str, in_process: Callable) -> None:
    code, out, err = in_process(*SMALL, "--models", tiny_models, "--budget-s", "3600")
    assert code == 0, err[-3000:]
    phases, summary = phases_of(out)
    compiled = [phases["compiled"], phases["compiled_channels_last"]]
    assert all(p["status"] == "skipped" and "CUDA only" in p["reason"] for p in compiled)
    ran = [name for name in PHASES if name not in ("compiled", "compiled_channels_last")]
    assert [phases[name]["status"] for name in ran] == ["ok"] * len(ran), out[-3000:]
    for name in ("eager", "channels_last", "eager_batch_1"):
        figure = phases[name]
        assert figure["timed_calls"] == 1 and figure["calls_with_errors"] == 0 and figure["decoder_images_per_s"] > 0
        assert figure["syncs_per_step"] is None  # counted on CUDA only
    assert phases["channels_last"]["max_level_difference_vs_eager"] <= 1
    assert phases["equality"]["vs_combined_float32"]["float32"]["max_level_difference"] <= 1
    flops = phases["models"]["flops_per_image"]
    assert flops["decoder"] == pytest.approx(2 * flops["unet_step"] + flops["movq"]) and flops["prior"] > 0
    co_located = phases["co_located"]
    assert co_located["mps"] == "not available" and co_located["layout_efficiency_constant"] == 0.9
    assert co_located["efficiency"] == min(co_located["shared_stream"]["efficiency"],
                                           co_located["separate_streams"]["efficiency"])  # fmt: skip
    assert summary["combined_images_per_s"] == phases["combined"]["combined_images_per_s"]
    assert summary["prior_seconds_per_image"] == phases["prior"]["prior_seconds_per_image"]
    assert summary["co_location_efficiency"] == {"measured": co_located["efficiency"], "layout_constant": 0.9}
    assert (
        summary["best"]["phase"] in ("eager", "channels_last", "eager_batch_1") and summary["speedup_vs_combined"] > 0
    )
    assert "--num-decoder-actors" in summary["eight_gpus"]["flags"] and summary["stopped"] is None
    assert summary["peak_tflops"] is None and summary["goals"]["fraction_of_peak"]["met"] is None
    # no --work-dir: the run made a scratch folder and removed it
    assert summary["work_dir_removed"] and not Path(summary["work_dir"]).exists()
    assert "kandinsky-bench-" in Path(summary["work_dir"]).name
    assert len([line for line in out.splitlines() if line.startswith("summary: ")]) == 9


def test_a_fake_clock_trims_timed_calls_and_skips_what_does_not_fit(
    tiny_models: str, tmp_path: Path, in_process: Callable
) -> None:
    """Every clock reading costs 1 s: with 40 s the first phases run, timed calls are cut short, and the phases whose
    estimate no longer fits are skipped."""
    code, out, err = in_process(
        *SMALL, "--models", tiny_models, "--work-dir", str(tmp_path), "--budget-s", "40", "--clock-step", "1",
        "--timed-batches", "3",
    )  # fmt: skip
    assert code == 0, err[-3000:]
    phases, _ = phases_of(out)
    lines = [phases[name] for name in PHASES]
    assert [line["status"] for line in lines[:3]] == ["ok", "ok", "ok"], out[-3000:]
    assert any(line["status"] == "ok" and line.get("timed_calls", 3) < 3 for line in lines)  # trimmed inside
    skipped = [line for line in lines if line["status"] == "skipped" and "CUDA" not in line["reason"]]
    assert skipped and all(line["reason"].startswith("budget: needs ~") for line in skipped)
    # a phase starts only while the budget lasts: the line before each one that ran came within it
    assert all(before["budget_used_s"] < 40 for before, line in zip(lines, lines[1:]) if line["status"] != "skipped")
    assert tmp_path.exists()  # a --work-dir is the user's: kept


def test_a_failing_phase_is_recorded_and_the_run_goes_on(
    tiny_models: str, tmp_path: Path, in_process: Callable
) -> None:
    """A prior checkpoint that cannot load: the phases that need the prior fail, the decoder phases still run."""
    models = tmp_path / "models"
    shutil.copytree(Path(tiny_models) / "prior", models / "prior")
    (models / "decoder").symlink_to(Path(tiny_models) / "decoder")
    (models / "prior" / "prior" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    code, out, err = in_process(*SMALL, "--models", str(models), "--budget-s", "3600", "--check-rows", "0")
    assert code == 0, err[-3000:]
    phases, summary = phases_of(out)
    statuses = {name: phases[name]["status"] for name in PHASES}
    assert statuses == {
        "models": "ok", "eager": "ok", "combined": "error", "prior": "error", "compiled": "skipped",
        "compiled_channels_last": "skipped", "channels_last": "ok", "equality": "skipped", "eager_batch_1": "ok",
        "co_located": "error",
    }  # fmt: skip
    assert phases["equality"]["reason"] == "--check-rows 0"
    assert all(phases[name]["error"] for name in ("combined", "prior", "co_located"))
    assert summary["combined_images_per_s"] is None and summary["speedup_vs_combined"] is None
    assert summary["best"]["decoder_images_per_s"] > 0 and "phase failed: " in err


@pytest.mark.parametrize(
    ("name", "accelerator", "peak"),
    [("NVIDIA H200 NVL", "H200-NVL", 835), ("NVIDIA H200", "H200", 989), ("NVIDIA GH200 480GB", "GH200", 989)],
)
def test_the_peak_comes_from_cluster_defaults(name: str, accelerator: str, peak: float, in_process: Callable) -> None:
    """No budget: the models phase is skipped for it, so every phase after for want of models; the summary still
    names the peak the device name reads from cluster/defaults.py."""
    code, out, err = in_process(*SMALL, "--budget-s", "0", "--device-name", name)
    assert code == 0, err[-3000:]
    phases, summary = phases_of(out)
    assert all(p["status"] == "skipped" for p in phases.values())
    assert all(p["reason"].startswith(("budget: ", "no models", "compile runs on CUDA")) for p in phases.values())
    assert (summary["accelerator"], summary["peak_tflops"]) == (accelerator, peak)
    assert summary["machine"]["device"] == name and summary["work_dir_removed"]


@pytest.mark.parametrize("args", [(), ("--device", "cpu")])
def test_refuses_without_a_gpu_in_one_line(args: tuple[str, ...], in_process: Callable) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = in_process(*args)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "error: benchmark gpu needs a CUDA device (or --device cpu --tiny for a dry run)"
    ]
