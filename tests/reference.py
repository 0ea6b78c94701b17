"""Single-process diffusers references: what a row must look like, computed the plain diffusers way."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image


@functools.lru_cache(maxsize=4)
def combined_pipeline(models_dir: str) -> object:
    """`KandinskyV22CombinedPipeline` assembled from ``models_dir/prior`` and ``models_dir/decoder``."""
    from diffusers import KandinskyV22CombinedPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(f"{models_dir}/prior")
    decoder = KandinskyV22Pipeline.from_pretrained(f"{models_dir}/decoder")
    pipe = KandinskyV22CombinedPipeline(
        unet=decoder.unet,
        scheduler=decoder.scheduler,
        movq=decoder.movq,
        prior_prior=prior.prior,
        prior_image_encoder=prior.image_encoder,
        prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer,
        prior_scheduler=prior.scheduler,
        prior_image_processor=prior.image_processor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text2img_reference(models_dir: str, row: dict, seed: int) -> np.ndarray:
    """The Combined pipeline's image for ``row`` alone with ``Generator("cpu").manual_seed(seed)``."""
    pipe = combined_pipeline(models_dir)
    kwargs = {
        name: row[name]
        for name in (
            "height",
            "width",
            "num_inference_steps",
            "guidance_scale",
            "prior_num_inference_steps",
            "prior_guidance_scale",
        )
        if row.get(name) is not None
    }
    image = pipe(
        prompt=row["prompt"],
        negative_prompt=row.get("negative_prompt"),
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    ).images[0]
    return np.asarray(image)


def load_png(path: str) -> np.ndarray:
    """Pixels of a PNG as an (H, W, 3) uint8 array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-channel difference in 0..255 levels; shapes must match."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
