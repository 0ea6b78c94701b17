"""The GPU path's parts that a CPU can check: the sync-free scheduler step, noise drawn up front, the vectorized
inpaint mask, compiled-shape guards, memory shares of co-located actors and plans that stay physical at small
sizes (the floors)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pytest
import torch
from diffusers import DDPMScheduler

from actors.compiled import ShapeGuard
from actors.denoise import DIFFUSERS_PREPARE_MASK, PlannedScheduler, call_start, draw_noise, prepare_mask
from cluster.accelerators import accelerator_from_device_name, accelerator_spec, canonical_accelerator
from cluster.layout import choose, sweep
from jobs.planning.calibration import estimate, estimated_profile, profile_for, stage_costs, unit_totals
from schemas.resources import CLIP_MEMORY_BYTES, co_located_memory_fraction

# The real decoder's scheduler (kandinsky-community/kandinsky-2-2-decoder scheduler_config.json)
DECODER_SCHEDULER = {
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "variance_type": "fixed_small",
}


def _unplanned(scheduler: DDPMScheduler, *, steps: int, begin: int, seed: int) -> torch.Tensor:
    """Two rows denoised diffusers' way (one generator, drawn per step) with a fixed stand-in model."""
    generator = torch.Generator("cpu").manual_seed(seed)
    sample = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(99))
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps[begin:]:
        sample = scheduler.step(torch.sin(sample * 3 + t / 1000), t, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize(("steps", "strength"), [(10, None), (7, 0.5), (50, 0.3)])
def test_the_planned_step_equals_diffusers_bit_for_bit(variance_type: str, steps: int, strength: float | None) -> None:
    """Precomputed per-step scalars and noise drawn before the loop give diffusers' samples exactly, and leave the
    row's generator where diffusers' loop leaves it; unplanned, the subclass is diffusers' scheduler."""
    config = dict(DECODER_SCHEDULER, variance_type=variance_type)
    begin = call_start(num_inference_steps=steps, strength=strength)
    for seed in (0, 3):
        a = _one_row(DDPMScheduler.from_config(config), steps=steps, begin=begin, seed=seed, planned=False)
        b = _one_row(PlannedScheduler.from_config(config), steps=steps, begin=begin, seed=seed, planned=True)
        assert torch.equal(a, b), (variance_type, steps, strength, (a - b).abs().max())
    a = _unplanned(DDPMScheduler.from_config(config), steps=steps, begin=begin, seed=1)
    b = _unplanned(PlannedScheduler.from_config(config), steps=steps, begin=begin, seed=1)
    assert torch.equal(a, b)


def _one_row(scheduler: DDPMScheduler, *, steps: int, begin: int, seed: int, planned: bool) -> torch.Tensor:
    """One row as its pipeline call denoises it: the initial latents, then each noisy step's noise, all from the
    row's generator (diffusers' loop draws them as it goes; the planned call up front)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, 4, 8, 8)
    if planned:
        noisy = scheduler.noisy_steps(num_inference_steps=steps, begin=begin)
        sample, noise = draw_noise(generator, shape=shape[1:], dtype=torch.float32, steps=noisy)
        scheduler.plan(begin=begin, noise=list(noise))
    else:
        sample = torch.randn(shape, generator=generator)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps[begin:]:
        out = scheduler.step(torch.sin(sample * 3 + t / 1000), t, sample, generator=None if planned else generator)
        sample = out.prev_sample
    if planned:
        scheduler.clear()
    # the generator ends where diffusers' loop leaves it
    assert generator.get_state().equal(_after_diffusers(seed, shape=shape, steps=steps, begin=begin))
    return sample


def _after_diffusers(seed: int, *, shape: tuple, steps: int, begin: int) -> torch.Tensor:
    """The generator state after diffusers' loop draws the initial latents and its noisy steps' noise (one draw per
    step with t > 0)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    torch.randn(shape, generator=generator)
    probe = DDPMScheduler.from_config(DECODER_SCHEDULER)
    probe.set_timesteps(steps)
    for t in probe.timesteps[begin:]:
        if t > 0:
            torch.randn(shape, generator=generator)
    return generator.get_state()


def test_a_planned_call_that_runs_out_of_noise_says_so() -> None:
    scheduler = PlannedScheduler.from_config(DECODER_SCHEDULER)
    scheduler.plan(begin=0, noise=[])
    scheduler.set_timesteps(3)
    sample = torch.zeros(1, 4, 2, 2)
    with pytest.raises(RuntimeError, match="no noise left for step 0"):
        scheduler.step(sample, scheduler.timesteps[0], sample)


def test_draw_noise_continues_the_generator_as_successive_draws_do() -> None:
    a, b = torch.Generator("cpu").manual_seed(5), torch.Generator("cpu").manual_seed(5)
    first, steps = draw_noise(a, shape=(4, 3, 3), dtype=torch.float32, steps=6)
    assert torch.equal(first, torch.randn((1, 4, 3, 3), generator=b))
    for k in range(6):
        assert torch.equal(steps[k], torch.randn((1, 4, 3, 3), generator=b))
    assert a.get_state().equal(b.get_state())
    assert call_start(num_inference_steps=50, strength=None) == 0
    assert call_start(num_inference_steps=50, strength=0.3) == 35  # diffusers' get_timesteps: 50 - int(15.0)


def test_the_vectorized_inpaint_mask_equals_diffusers() -> None:
    generator = torch.Generator("cpu").manual_seed(0)
    for shape in ((1, 1, 9, 7), (3, 4, 12, 12)):
        masks = (torch.rand(shape, generator=generator) > 0.7).float()
        masks[0, 0, 0, 0] = 0.5  # a value neither 0 nor 1 zeroes its neighbours too
        assert torch.equal(prepare_mask(masks), DIFFUSERS_PREPARE_MASK(masks.clone()))


def test_a_shape_guard_compiles_warmed_shapes_and_runs_others_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    guard = ShapeGuard(lambda x: calls.append("compiled") or x, eager=lambda x: calls.append("eager") or x, name="UNet")
    guard(torch.zeros(2, 4))
    guard(torch.zeros(4, 4))
    guard.seal()
    guard(torch.zeros(2, 4))
    with caplog.at_level(logging.WARNING, logger="kandinsky_render.actors.compiled"):
        guard(torch.zeros(3, 4))
        guard(torch.zeros(3, 4))
    assert calls == ["compiled", "compiled", "compiled", "eager", "eager"]
    assert len(caplog.records) == 1 and "(3, 4) was not compiled at start" in caplog.text  # one warning per guard


@pytest.mark.parametrize("total_gb", [16, 24, 80, 141])
def test_co_located_actors_split_a_gpus_memory(total_gb: int) -> None:
    total = total_gb * 1e9
    clip, decoder = co_located_memory_fraction("clip", total), co_located_memory_fraction("decoder", total)
    assert clip + decoder == pytest.approx(1.0)
    assert 0.1 <= clip <= 0.5 and clip * total >= min(CLIP_MEMORY_BYTES, total / 2)
    with pytest.raises(ValueError, match="memory role"):
        co_located_memory_fraction("vae", total)


@pytest.mark.parametrize(
    ("device_name", "accelerator"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100-PCIE"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200-NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),  # the peak is the same; memory comes from torch
        ("Radeon Pro", None),
    ],
)
def test_device_names_map_to_their_own_profile(device_name: str, accelerator: str | None) -> None:
    assert accelerator_from_device_name(device_name) == accelerator
    if accelerator:
        assert accelerator_spec(accelerator.lower()) == accelerator_spec(accelerator)
        assert canonical_accelerator(accelerator.lower()) == accelerator
        assert profile_for(accelerator.lower()).name == accelerator


def _work(size: int, steps: int, rows: int = 64) -> pa.Table:
    return pa.table(
        {
            "mode": ["text2img"] * rows,
            "height": [size] * rows,
            "width": [size] * rows,
            "num_inference_steps": [steps] * rows,
            "prior_num_inference_steps": [25] * rows,
            "guidance_scale": [4.0] * rows,
            "prior_guidance_scale": [4.0] * rows,
            "strength": [None] * rows,
        }
    )


def test_floors_keep_small_images_launch_bound() -> None:
    """At 64x64 a decoder step is launch-bound: the floors, not the FLOPs, are most of its time; at 768x768 they
    are under a tenth; a batch shares them."""
    h100 = estimated_profile("H100")
    small, large = unit_totals(_work(64, 50)), unit_totals(_work(768, 50))
    small_16, small_1 = estimate(small, h100, batch_size=16), estimate(small, h100, batch_size=1)
    floors_64 = 64 * 50 * h100.decoder_fixed_step_seconds / 16
    assert floors_64 / small_16["decoder"] > 0.5
    large_16 = estimate(large, h100, batch_size=16)
    floors_768 = (64 * 50 * h100.decoder_fixed_step_seconds + 64 * h100.decoder_call_seconds) / 16
    assert floors_768 / large_16["decoder"] < 0.1
    floors = 64 * 50 * h100.decoder_fixed_step_seconds + 64 * h100.decoder_call_seconds
    assert small_1["decoder"] - small_16["decoder"] == pytest.approx(floors * (1 - 1 / 16))  # alone: every floor


@pytest.mark.parametrize("num_gpus", [2, 8, 64])
def test_the_h100_layout_at_768_and_50_steps_is_within_5_percent_of_the_best(num_gpus: int) -> None:
    rows = 256
    costs = stage_costs(estimated_profile("H100"), unit_totals(_work(768, 50, rows)), num_images=rows, score=False)
    chosen, best = choose(num_gpus=num_gpus, costs=costs), sweep(num_gpus=num_gpus, costs=costs)[0]
    assert chosen.images_per_s >= 0.95 * best.images_per_s, (chosen.describe(), best.describe())


@pytest.mark.parametrize("size", [64, 128, 256])
def test_small_images_never_get_more_clip_gpus_than_decoder_gpus(size: int) -> None:
    rows = 256
    costs = stage_costs(estimated_profile("H100"), unit_totals(_work(size, 50, rows)), num_images=rows, score=False)
    layout = choose(num_gpus=8, costs=costs)
    gpus = {g.name: g.num_actors * g.num_gpus for g in layout.groups}
    assert gpus.get("decoder", 0) >= gpus.get("clip", 0), layout.describe()
