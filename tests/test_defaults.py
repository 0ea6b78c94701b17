"""Defaults chosen for the machine (cluster/defaults.py, jobs/planning/machine.py): values, reasons, overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cluster.defaults import (
    CPU_BATCH_SIZE,
    CPU_PRIOR_BATCH_SIZE,
    GPU_FALLBACK_BATCH_SIZE,
    GPU_MAX_BATCH_SIZE,
    Machine,
    Workload,
    choose_defaults,
)
from cluster.layout import StageCosts
from jobs.options.config_file import parse_args
from jobs.options.flags import build_parser
from jobs.options.job_config import config_from_args
from jobs.planning.machine import local_machine, machine_defaults
from schemas.config import JobConfig
from schemas.resources import StageResources

TINY = Workload(largest_pixels=128 * 128, decoder_weight_bytes=2e6, value_bytes=4)
REAL_768 = Workload(largest_pixels=768 * 768, decoder_weight_bytes=2.6e9, value_bytes=2)


def config(**fields) -> JobConfig:
    return JobConfig(manifest="m.parquet", output="out", **fields)


def test_cpu_machine_gets_the_layout_benchmark_cpu_measured_best() -> None:
    chosen, choices = choose_defaults(config(), Machine(cpus=2, memory_bytes=16e9), TINY)
    assert chosen.decoder.min_actors == 2 and chosen.decoder.num_cpus == 1.0
    assert chosen.prior.num_cpus == 0.0 and chosen.writer.num_cpus == 0.0
    assert chosen.batch_size == CPU_BATCH_SIZE and chosen.prior_batch_size == CPU_PRIOR_BATCH_SIZE
    assert chosen.accel.channels_last is False  # diffusers' own memory format: images within 1 level (README)
    flags = {choice.flag: choice for choice in choices}
    assert set(flags) >= {"--layout", "--num-decoder-actors", "--decoder-cpus", "--writer-cpus", "--batch-size",
                          "--prior-batch-size", "--channels-last"}  # fmt: skip
    assert chosen.layout == "one-process" and "no GPU" in flags["--layout"].reason
    assert "2 found" in flags["--num-decoder-actors"].reason  # every value says why
    assert all(choice.reason for choice in choices)
    # stages without actors of their own (they run in the model actors) take no CPU and print nothing
    assert chosen.depth.num_cpus == 0.0 and not {"--depth-cpus", "--score-cpus", "--prior-cpus"} & set(flags)


def test_every_flag_the_user_set_is_kept_and_not_reported() -> None:
    mine = config(
        layout="one-process",
        batch_size=3,
        prior_batch_size=5,
        decoder=StageResources(num_actors=1, num_cpus=2.0),
        prior=StageResources(num_cpus=1.0),
        writer=StageResources(num_cpus=0.5),
        accel=dataclasses.replace(config().accel, channels_last=False),
    )
    chosen, choices = choose_defaults(mine, Machine(cpus=8, memory_bytes=64e9), TINY)
    assert (chosen.batch_size, chosen.prior_batch_size, chosen.decoder, chosen.accel.channels_last) == (
        3, 5, mine.decoder, False,
    )  # fmt: skip
    assert chosen.prior.num_cpus == 1.0 and chosen.writer.num_cpus == 0.5
    assert not choices


def test_cpu_decoders_are_capped_by_memory() -> None:
    # 64 cores but room for few copies of a real-size decoder and its batch
    chosen, choices = choose_defaults(config(), Machine(cpus=64, memory_bytes=60e9), REAL_768)
    assert 1 <= chosen.decoder.min_actors < 64
    reason = {c.flag: c.reason for c in choices}["--num-decoder-actors"]
    assert "GB" in reason and str(chosen.decoder.min_actors) in reason


def test_gpu_batch_fits_the_gpu_type_memory_and_halves_with_pixels() -> None:
    h100 = Machine(cpus=64, gpus=8, memory_bytes=500e9, accelerator_type="H100")
    l4 = dataclasses.replace(h100, accelerator_type="L4")
    big, _ = choose_defaults(config(), h100, REAL_768)
    small, choices = choose_defaults(config(), l4, REAL_768)
    assert big.batch_size == GPU_MAX_BATCH_SIZE and 1 <= small.batch_size < big.batch_size
    assert "L4's 24 GB" in {c.flag: c.reason for c in choices}["--batch-size"]
    larger, _ = choose_defaults(config(), l4, dataclasses.replace(REAL_768, largest_pixels=2 * 768 * 768))
    assert larger.batch_size == max(1, small.batch_size // 2)
    assert big.prior_batch_size == big.batch_size and big.accel.channels_last is False
    assert big.decoder.num_cpus == 1.0 and big.prior.num_cpus == 1.0
    # every value chosen is reported with a reason, stages the run lacks excepted
    flags = {c.flag: c for c in choose_defaults(config(), h100, REAL_768)[1]}
    assert {"--layout", "--batch-size", "--prior-batch-size", "--channels-last", "--prior-cpus", "--decoder-cpus",
            "--writer-cpus", "--num-writer-actors"} <= set(flags) and "--depth-cpus" not in flags  # fmt: skip
    assert all(choice.reason for choice in flags.values())
    assert "not been measured on a GPU" in flags["--channels-last"].reason


def test_gpu_of_unknown_type_falls_back_and_says_so() -> None:
    chosen, choices = choose_defaults(config(), Machine(cpus=4, gpus=2), REAL_768)
    assert chosen.batch_size == GPU_FALLBACK_BATCH_SIZE
    assert "unknown" in {c.flag: c.reason for c in choices}["--batch-size"]


def test_stage_costs_decide_the_layout() -> None:
    h100 = Machine(cpus=64, gpus=8, accelerator_type="H100")
    # a prior a third as costly as a decoder: 8 GPUs -> 2 dedicated CLIP GPUs feed 6 decoders
    costly = dataclasses.replace(REAL_768, costs=StageCosts(prior=0.3, decoder=1.0, source="H100 (measured)"))
    chosen, choices = choose_defaults(config(), h100, costly)
    assert (chosen.layout, chosen.prior.min_actors, chosen.decoder.min_actors) == ("dedicated", 2, 6)
    assert "H100 (measured)" in {c.flag: c.reason for c in choices}["--layout"]
    # the real ratio (~4%): on 8 GPUs a dedicated CLIP GPU would idle, so the CLIP actor sits beside a decoder
    cheap = dataclasses.replace(REAL_768, costs=StageCosts(prior=0.02, decoder=0.5))
    chosen, choices = choose_defaults(config(), h100, cheap)
    assert (chosen.layout, chosen.prior.min_actors, chosen.decoder.min_actors) == ("co-located", 1, 8)
    assert chosen.prior.num_gpus + chosen.decoder.num_gpus == 1.0
    # a layout the user names is kept, with that layout's best counts
    mine, _ = choose_defaults(config(layout="dedicated"), h100, cheap)
    assert (mine.layout, mine.prior.min_actors, mine.decoder.min_actors) == ("dedicated", 1, 7)


def test_a_count_the_user_sets_leaves_room_for_the_other_group() -> None:
    four = Machine(cpus=16, gpus=4, accelerator_type="H100")
    heavy_prior = dataclasses.replace(REAL_768, costs=StageCosts(prior=2.0, decoder=1.0))
    alone, _ = choose_defaults(config(layout="dedicated"), four, heavy_prior)
    assert alone.prior.min_actors == 2  # the costs alone ask for 2 CLIP GPUs
    decoders = config(layout="dedicated", decoder=StageResources(num_actors="3", num_gpus=1.0))
    chosen, choices = choose_defaults(decoders, four, heavy_prior)
    assert (chosen.prior.num_actors, chosen.decoder.num_actors) == ("1:", "3")
    assert {c.flag: c.value for c in choices}["--num-prior-actors"] == "1:"
    clips = config(layout="dedicated", prior=StageResources(num_actors="3", num_gpus=1.0))
    chosen, _ = choose_defaults(clips, four, heavy_prior)
    assert (chosen.prior.num_actors, chosen.decoder.num_actors) == ("3", "1:")
    planned = Machine(cpus=16, gpus=2, planned_gpus=8, accelerator_type="H100")
    chosen, _ = choose_defaults(decoders, planned, heavy_prior)  # 2 up of 8: start with 1 CLIP, grow to 5
    assert chosen.prior.num_actors == "1:5"


def test_writers_leave_the_gpu_actors_their_cpus() -> None:
    fast = dataclasses.replace(REAL_768, costs=StageCosts(prior=0.001, decoder=0.01))
    roomy, _ = choose_defaults(config(), Machine(cpus=64, gpus=2, accelerator_type="H100"), fast)
    assert roomy.writer.min_actors > 3  # as many as encode the predicted images/s
    tight, choices = choose_defaults(config(), Machine(cpus=5, gpus=2, accelerator_type="H100"), fast)
    model_cpus = tight.prior.min_actors * tight.prior.num_cpus + tight.decoder.min_actors * tight.decoder.num_cpus
    assert tight.writer.min_actors == int(5 - model_cpus) >= 1
    assert "CPUs left beside the GPU actors" in {c.flag: c.reason for c in choices}["--num-writer-actors"]


def test_machine_defaults_reads_the_tiny_checkpoints_and_the_calibration(tiny_models: str) -> None:
    from schemas.models import ModelPaths

    tiny = config(models=ModelPaths.resolve(models_dir=tiny_models))
    chosen, _ = machine_defaults(tiny, Machine(cpus=2, memory_bytes=8e9), modes=["text2img"], largest_pixels=0,
                                 needs_depth=False)  # fmt: skip
    assert chosen.decoder.min_actors == 2  # the tiny decoder is a few MB: memory is no limit
    # a hub checkpoint counts as the real model's size; the H100 profile (estimated from FLOPs) lays out the stages
    h100 = Machine(cpus=64, gpus=8, memory_bytes=500e9, accelerator_type="H100")
    chosen, choices = machine_defaults(config(), h100, modes=["text2img"], largest_pixels=768 * 768, needs_depth=False)
    assert chosen.prior.min_actors >= 1 and any("H100 profile, estimated" in c.reason for c in choices)


def test_local_machine_counts_this_process_cpus() -> None:
    machine = local_machine()
    assert machine.cpus >= 1 and machine.gpus == 0 and machine.memory_bytes > 0


def test_flags_leave_machine_options_unset_and_override_them(tmp_path: Path) -> None:
    def parsed(*flags: str) -> JobConfig:
        args = parse_args(build_parser(), ["--manifest", "m.parquet", "--output", str(tmp_path), *flags])
        return config_from_args(args, environ={})

    unset = parsed()
    assert unset.batch_size is None and unset.decoder.num_cpus is None and unset.accel.channels_last is None
    chosen = parsed("--batch-size", "2", "--decoder-cpus", "1.5", "--no-channels-last")
    assert chosen.batch_size == 2 and chosen.decoder.num_cpus == 1.5 and chosen.accel.channels_last is False
    assert parsed("--channels-last").accel.channels_last is True


def test_a_run_prints_and_records_its_choices(tmp_path: Path, tiny_models: str, caplog) -> None:
    import json
    import logging

    from jobs.job import run_job
    from schemas.models import ModelPaths
    from tests.helpers.rows import write_manifest

    rows = [{"id": f"r{i}", "prompt": "a fox", "seed": i, "height": 64, "width": 64, "num_inference_steps": 2,
             "prior_num_inference_steps": 2} for i in range(2)]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    job = JobConfig(manifest=manifest, output=str(tmp_path / "out"), runner="local", prior_batch_size=2,
                    models=ModelPaths.resolve(models_dir=tiny_models))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kandinsky_render.jobs.planning.machine"):
        summary = run_job(job)
    assert "defaults for this machine" in caplog.text and "--batch-size 16" in caplog.text
    recorded = json.loads((tmp_path / "out" / "stats.json").read_text())
    chosen = {c["flag"]: c for c in recorded["defaults"]["chosen"]}
    assert chosen["--batch-size"]["value"] == 16 and chosen["--batch-size"]["reason"]
    assert "--prior-batch-size" not in chosen  # set by the caller
    timeline = recorded["timeline"]
    assert (
        timeline["run_started"] <= timeline["planned"] <= timeline["first_image_stored"] <= timeline["gallery_written"]
    )
    assert summary.stats["timeline"]["gallery_written"] == timeline["gallery_written"]


def test_cpu_decoders_no_more_than_the_run_has_batches() -> None:
    few = dataclasses.replace(TINY, num_images=10)  # one batch of 16
    chosen, choices = choose_defaults(config(), Machine(cpus=8, memory_bytes=64e9), few)
    assert chosen.decoder.min_actors == 1
    assert "the run has 10 image(s)" in {c.flag: c.reason for c in choices}["--num-decoder-actors"]
    many = dataclasses.replace(TINY, num_images=40)  # three batches
    assert choose_defaults(config(), Machine(cpus=8, memory_bytes=64e9), many)[0].decoder.min_actors == 3
