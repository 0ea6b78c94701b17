"""diffusers' own Kandinsky 2.2 pipelines assembled from a models dir: what tests and benchmarks compare with."""

from __future__ import annotations

from typing import Any


def combined_pipeline(models: str, *, dtype: Any, device: str) -> Any:
    """diffusers' `KandinskyV22CombinedPipeline` assembled from ``models/prior`` and ``models/decoder``."""
    from diffusers import KandinskyV22CombinedPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior = KandinskyV22PriorPipeline.from_pretrained(f"{models}/prior", dtype=dtype)
    decoder = KandinskyV22Pipeline.from_pretrained(f"{models}/decoder", dtype=dtype)
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
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
