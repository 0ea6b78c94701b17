"""``benchmark step``: the decoder's guided denoising step compiles whole, and the sync-free path renders diffusers'
pixels exactly.

Three checks on the tiny models (or ``--models``), on this machine's device:

1. graph breaks: the guided step (UNet on the doubled batch, classifier-free guidance, the DDPM update with
   pre-drawn noise: `actors.denoise.ddpm_update`) traced by dynamo; 0 means ``fullgraph=True`` holds;
2. max diff: the decoder's planned call (`actors.denoise.PlannedScheduler`, each row's noise drawn up front,
   the initial noise as ``latents``) against diffusers' own pipeline call with the rows' CPU generators, batch
   ``--batch`` at equal composition, in 0-255 levels (0: the same pixels);
3. compiled max diff: a denoising loop of the step compiled with ``fullgraph=True`` (``--backend``: aot_eager
   keeps eager kernels; inductor generates its own, so float noise may move a few levels).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from jobs.benchmarks.common import Mode, machine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="models folder (default: the tiny models, built offline on first use)")
    parser.add_argument("--size", type=int, default=64, help="image height and width, pixels")
    parser.add_argument("--steps", type=int, default=4, help="decoder denoising steps")
    parser.add_argument("--batch", type=int, default=2, help="images per call (equal composition on both sides)")
    parser.add_argument("--guidance", type=float, default=4.0, help="guidance_scale")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend of check 3 (aot_eager, inductor)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from diffusers import KandinskyV22Pipeline

    from actors.common import seeded_generator
    from actors.denoise import PlannedScheduler, draw_noise
    from actors.images import to_uint8
    from jobs.dev.tiny_models import build_tiny_models, default_tiny_models_dir

    torch.set_num_threads(1)  # bitwise repeatable on the CPU
    device = torch.device(args.device)
    models = args.models or default_tiny_models_dir()
    if not args.models:
        build_tiny_models(models)
    stock = KandinskyV22Pipeline.from_pretrained(f"{models}/decoder").to(device)
    stock.set_progress_bar_config(disable=True)
    planned = KandinskyV22Pipeline(
        **{**stock.components, "scheduler": PlannedScheduler.from_config(stock.scheduler.config)}
    )
    planned.set_progress_bar_config(disable=True)
    dim = int(stock.unet.config.encoder_hid_dim)
    embeds = torch.randn((args.batch, dim), generator=seeded_generator(1)).to(device)
    negative = torch.randn((args.batch, dim), generator=seeded_generator(2)).to(device)
    seeds = [100 + k for k in range(args.batch)]
    call = {"image_embeds": embeds, "negative_image_embeds": negative, "height": args.size, "width": args.size,
            "num_inference_steps": args.steps, "guidance_scale": args.guidance, "output_type": "pt"}  # fmt: skip

    reference = stock(**call, generator=[seeded_generator(seed) for seed in seeds]).images
    shape = (int(stock.movq.config.latent_channels), *_latent_size(stock, args.size))
    steps = planned.scheduler.noisy_steps(num_inference_steps=args.steps, begin=0)
    drawn = [draw_noise(seeded_generator(seed), shape=shape, dtype=stock.unet.dtype, steps=steps) for seed in seeds]
    first = torch.cat([f for f, _ in drawn]).to(device)
    noise = torch.cat([s for _, s in drawn], dim=1).to(device)
    planned.scheduler.plan(begin=0, noise=list(noise))
    try:
        ours = planned(**call, latents=first).images
    finally:
        planned.scheduler.clear()
    diff = _levels(ours, reference, to_uint8)

    step = _guided_step(stock.unet, guidance=args.guidance)
    scheduler = PlannedScheduler.from_config(stock.scheduler.config)
    scheduler.plan(begin=0, noise=[])
    scheduler.set_timesteps(args.steps, device=device)
    coefficients = scheduler._steps
    conditioning = torch.cat([negative, embeds]).to(stock.unet.dtype)

    def inputs(latents: Any, k: int) -> tuple:
        c = coefficients[k]
        scale = c.noise_scale if c.noise_scale is not None else torch.zeros(())
        draw = noise[k] if c.noise_scale is not None else torch.zeros_like(latents)
        return (latents, scheduler.timesteps[k], conditioning, c.alpha_prod_t, c.beta_prod_t, c.original_coeff,
                c.current_coeff, scale, draw)  # fmt: skip

    import torch._dynamo as dynamo

    dynamo.reset()
    explained = dynamo.explain(step)(*inputs(first, 0))
    compiled = torch.compile(step, fullgraph=True, backend=args.backend)
    started = time.perf_counter()
    latents = first
    with torch.inference_mode():
        for k in range(len(coefficients)):
            latents = compiled(*inputs(latents, k))
        images = stock.movq.decode(latents, force_not_quantize=True)["sample"]
    compiled_seconds = time.perf_counter() - started
    compiled_diff = _levels(images, reference, to_uint8)
    scheduler.clear()
    lines = [
        f"graph breaks: {explained.graph_break_count}",
        f"max diff: {diff}",
        f"compiled ({args.backend}) max diff: {compiled_diff}",
    ]
    for line in lines:
        print(line, flush=True)
    return {
        "mode": "step",
        "machine": machine(),
        "device": str(device),
        "size": args.size,
        "steps": args.steps,
        "batch": args.batch,
        "graph_breaks": explained.graph_break_count,
        "graphs": explained.graph_count,
        "max_diff": diff,
        "compiled_backend": args.backend,
        "compiled_max_diff": compiled_diff,
        "compiled_loop_seconds": round(compiled_seconds, 3),
    }


def _latent_size(pipe: Any, size: int) -> tuple[int, int]:
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width

    return downscale_height_and_width(size, size, pipe.movq_scale_factor)


def _guided_step(unet: Any, *, guidance: float) -> Any:
    """The pipeline's loop body for a fixed-variance scheduler, as one function of tensors (what fullgraph needs)."""
    import torch

    from actors.denoise import ddpm_update

    def step(latents, t, conditioning, alpha, beta, original, current, scale, noise):  # noqa: ANN001, ANN202
        model_input = torch.cat([latents] * 2)
        out = unet(sample=model_input, timestep=t, encoder_hidden_states=None,
                   added_cond_kwargs={"image_embeds": conditioning}, return_dict=False)[0]  # fmt: skip
        noise_pred, _ = out.split(latents.shape[1], dim=1)
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (text - uncond)
        sample, _ = ddpm_update(noise_pred, latents, alpha_prod_t=alpha, beta_prod_t=beta, original_coeff=original,
                                current_coeff=current, noise_scale=scale, noise=noise, prediction_type="epsilon",
                                clip_range=None)  # fmt: skip
        return sample

    return step


def _levels(images: Any, reference: Any, to_uint8: Any) -> int:
    """The largest difference in 0-255 levels between two ``output_type="pt"`` batches (raw MoVQ output)."""
    import numpy as np

    def pixels(batch: Any) -> np.ndarray:
        values = (batch * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return to_uint8(values).astype(np.int16)

    return int(np.abs(pixels(images) - pixels(reference)).max())


MODES = (
    Mode(
        name="step",
        help="the decoder's guided step compiles whole (graph breaks: 0) and renders diffusers' pixels (max diff: 0)",
        add_arguments=add_arguments,
        run=run,
        quiet_libraries=True,
    ),
)
