"""The decoder's denoising step without host syncs: a planned DDPM scheduler and each row's noise drawn up front.

diffusers' `DDPMScheduler.step` syncs the host several times per step (it indexes its table with the
device timestep, looks the step up with ``nonzero()`` and branches in Python on device tensors) and
draws each step's variance noise on the host from the rows' CPU generators, then copies it to the
device: the GPU idles while the host catches up, every step. `PlannedScheduler` does the same
arithmetic on the same tensors, with the step's position known on the host (the pipeline calls
``step`` once per timestep, in order, from the first the call runs) and the noise taken from what
`draw_noise` drew before the call, in the order diffusers draws it, from the same generators. So the
pixels are the very same (tests/test_decoder_pixels.py, ``kandinsky-render benchmark step``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.kandinsky2_2 import pipeline_kandinsky2_2_inpainting as inpainting
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

# What the plan covers; any other scheduler configuration runs diffusers' own step (with its syncs).
PLANNED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
PLANNED_PREDICTIONS = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True, kw_only=True)
class StepCoefficients:
    """One step's scalars, computed as diffusers computes them (0-d tensors on the table's device)."""

    t: int  # the timestep, on the host
    alpha_prod_t: torch.Tensor
    beta_prod_t: torch.Tensor
    original_coeff: torch.Tensor  # pred_original_sample_coeff
    current_coeff: torch.Tensor  # current_sample_coeff
    noise_scale: torch.Tensor | None  # what multiplies the step's noise (None: t == 0, no noise)


def ddpm_update(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    alpha_prod_t: torch.Tensor,
    beta_prod_t: torch.Tensor,
    original_coeff: torch.Tensor,
    current_coeff: torch.Tensor,
    noise_scale: torch.Tensor | None,
    noise: torch.Tensor | None,
    prediction_type: str,
    clip_range: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM update from a step's scalars (`StepCoefficients`): diffusers' ``step`` arithmetic, in its order, with
    no host work (what torch.compile can take whole). Returns (previous sample, predicted original sample)."""
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    elif prediction_type == "sample":
        pred_original_sample = model_output
    else:  # v_prediction
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
    if clip_range is not None:
        pred_original_sample = pred_original_sample.clamp(-clip_range, clip_range)
    pred_prev_sample = original_coeff * pred_original_sample + current_coeff * sample
    variance = 0
    if noise_scale is not None:
        variance = noise_scale * noise
    return pred_prev_sample + variance, pred_original_sample


def plannable(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a DDPM scheduler whose configuration `PlannedScheduler` reproduces exactly."""
    config = getattr(scheduler, "config", None)
    return (
        isinstance(scheduler, DDPMScheduler)
        and config is not None
        and config.variance_type in PLANNED_VARIANCES
        and config.prediction_type in PLANNED_PREDICTIONS
        and not config.thresholding
    )


class PlannedScheduler(DDPMScheduler):
    """A DDPM scheduler whose step never syncs the host when a call was planned (see the module docstring); unplanned,
    it is diffusers' scheduler. diffusers' step syncs the host per step (upstream: scheduling_ddpm.py ``step``)."""

    # Per-call state (no __init__ of its own: diffusers registers the config from DDPMScheduler's signature).
    _begin: int | None = None  # the index of the first step a planned call runs
    _noise: Sequence[torch.Tensor] = ()  # each noisy step's noise, in order
    _steps: Sequence[StepCoefficients] = ()
    _index = 0

    @functools.cached_property
    def _device_alphas(self) -> dict[str, torch.Tensor]:
        return {}  # add_noise's table per device, uploaded once

    @functools.cached_property
    def _noisy(self) -> dict[tuple[int, int], int]:
        return {}

    # ------------------------------------------------------------------ planning

    def plan(self, *, begin: int, noise: Sequence[torch.Tensor]) -> None:
        """The next call runs its steps from index ``begin`` (0, or img2img's ``t_start``) and takes each noisy step's
        variance noise from ``noise`` (``(B, C, h, w)`` each, on the device, in step order)."""
        self._begin, self._noise, self._index = begin, list(noise), 0

    def clear(self) -> None:
        """Forget the plan (after the call): unplanned calls run diffusers' own step."""
        self._begin, self._noise, self._steps, self._index = None, [], [], 0

    @property
    def planned(self) -> bool:
        return self._begin is not None

    def noisy_steps(self, *, num_inference_steps: int, begin: int) -> int:
        """How many steps of a call of ``num_inference_steps`` run from ``begin`` draw variance noise (t > 0)."""
        key = (num_inference_steps, begin)
        if key not in self._noisy:
            probe = DDPMScheduler.from_config(self.config)
            probe.set_timesteps(num_inference_steps)
            self._noisy[key] = sum(1 for t in probe.timesteps.tolist()[begin:] if t > 0)
        return self._noisy[key]

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, timesteps: Any = None) -> None:
        """diffusers' timesteps; for a planned call also every step's coefficients (no sync: host indices)."""
        super().set_timesteps(num_inference_steps, device="cpu", timesteps=timesteps)
        host = [int(t) for t in self.timesteps.tolist()]
        self.timesteps = self.timesteps.to(device) if device is not None else self.timesteps
        self._index = 0
        self._steps = [self._coefficients(host, k) for k in range(len(host))] if self.planned else []

    def _coefficients(self, host: list[int], k: int) -> StepCoefficients:
        """diffusers' step scalars for the ``k``-th timestep, with the same operands in the same order."""
        t = host[k]
        prev_t = host[k + 1] if k + 1 < len(host) else -1  # `previous_timestep` with num_inference_steps set
        if self.custom_timesteps is False and not self.num_inference_steps:
            prev_t = t - 1
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        original_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        current_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        noise_scale = None
        if t > 0:
            variance = self._variance(alpha_prod_t, alpha_prod_t_prev)
            noise_scale = variance if self.variance_type == "fixed_small_log" else variance**0.5
        return StepCoefficients(
            t=t,
            alpha_prod_t=alpha_prod_t,
            beta_prod_t=beta_prod_t,
            original_coeff=original_coeff,
            current_coeff=current_coeff,
            noise_scale=noise_scale,
        )

    def _variance(self, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor) -> torch.Tensor:
        """`_get_variance` for the fixed variance types, from the step's alphas (its own code, no index lookup)."""
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
        variance = torch.clamp(variance, min=1e-20)
        kind = self.config.variance_type
        if kind == "fixed_small_log":
            variance = torch.log(variance)
            variance = torch.exp(0.5 * variance)
        elif kind == "fixed_large":
            variance = current_beta_t
        elif kind == "fixed_large_log":
            variance = torch.log(current_beta_t)
        return variance

    # ------------------------------------------------------------------ the step

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: Any = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """diffusers' step, for a planned call with the step's precomputed scalars and planned noise."""
        if not self.planned:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        position = self._begin + self._index
        if position >= len(self._steps):
            raise RuntimeError(f"planned scheduler: step {position} of a call of {len(self._steps)} steps")
        step = self._steps[position]
        self._index += 1
        noise = None
        if step.noise_scale is not None:
            if not self._noise:
                raise RuntimeError(f"planned scheduler: no noise left for step {position} (t={step.t})")
            noise, self._noise = self._noise[0], self._noise[1:]
        pred_prev_sample, pred_original_sample = ddpm_update(
            model_output,
            sample,
            alpha_prod_t=step.alpha_prod_t,
            beta_prod_t=step.beta_prod_t,
            original_coeff=step.original_coeff,
            current_coeff=step.current_coeff,
            noise_scale=step.noise_scale,
            noise=noise,
            prediction_type=self.config.prediction_type,
            clip_range=self.config.clip_sample_range if self.config.clip_sample else None,
        )
        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers' add_noise with its table uploaded once per device (not every call: a sync each time)."""
        key = str(original_samples.device)
        if key not in self._device_alphas:
            self._device_alphas[key] = self.alphas_cumprod.to(device=original_samples.device)
        self.alphas_cumprod = self._device_alphas[key]
        return super().add_noise(original_samples, noise, timesteps)


def call_start(*, num_inference_steps: int, strength: float | None) -> int:
    """The index of the first step a call runs: 0, or for img2img-family pipelines their ``t_start``
    (``get_timesteps``: ``n - min(int(n * strength), n)``)."""
    if strength is None:
        return 0
    return max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)


def draw_noise(
    generator: torch.Generator, *, shape: tuple[int, ...], dtype: torch.dtype, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a row's pipeline call draws from its CPU ``generator``, in diffusers' order and shapes (each draw
    ``(1, *shape)``, as `randn_tensor` draws per generator): the initial noise, then each noisy step's.

    Returns (initial ``(1, *shape)``, steps ``(steps, 1, *shape)``); ``generator`` ends where the call would leave it.
    """
    first = torch.randn((1, *shape), generator=generator, device="cpu", dtype=dtype)
    draws = [torch.randn((1, *shape), generator=generator, device="cpu", dtype=dtype) for _ in range(steps)]
    return first, (torch.stack(draws) if draws else torch.empty((0, 1, *shape), dtype=dtype))


# diffusers' inpaint pipeline enlarges the mask's keep region with a Python loop over every latent pixel, reading a
# device tensor each time: a host sync per pixel (9,216 per call at 768x768; upstream:
# pipeline_kandinsky2_2_inpainting.py ``prepare_mask``). `prepare_mask` is the same rule as whole-tensor operations.
_NEIGHBOURS = ((-1, 0), (0, -1), (-1, -1), (1, 0), (0, 1), (1, 1))  # the pixels a non-1 pixel zeroes, as diffusers
DIFFUSERS_PREPARE_MASK = inpainting.prepare_mask  # the original, kept for the equality test


def prepare_mask(masks: torch.Tensor) -> torch.Tensor:
    """diffusers' ``prepare_mask`` for (B, C, H, W) masks: every pixel whose channel 0 is not 1 zeroes, in every
    channel, its neighbours above, left, above-left, below, right and below-right. The same values, no sync."""
    out = masks.clone()
    zero = masks[:, :1] != 1  # (B, 1, H, W): the pixels that zero their neighbours
    height, width = masks.shape[-2:]
    for di, dj in _NEIGHBOURS:
        target = torch.zeros_like(zero)
        target[..., max(di, 0) : height + min(di, 0), max(dj, 0) : width + min(dj, 0)] = zero[
            ..., max(-di, 0) : height - max(di, 0), max(-dj, 0) : width - max(dj, 0)
        ]
        out = out.masked_fill(target, 0)
    return out


def use_vectorized_prepare_mask() -> None:
    """Install `prepare_mask` in diffusers' inpaint pipeline module (what its ``__call__`` looks the name up in)."""
    inpainting.prepare_mask = prepare_mask
