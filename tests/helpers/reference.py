"""Single-process diffusers references: what a row must look like, computed the plain diffusers way."""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import torch
from PIL import Image


@functools.lru_cache(maxsize=4)
def combined_pipeline(models_dir: str) -> object:
    """`KandinskyV22CombinedPipeline` assembled from ``models_dir/prior`` and ``models_dir/decoder`` (fp32, CPU)."""
    from jobs.dev.reference import combined_pipeline as assemble

    return assemble(models_dir, dtype=torch.float32, device="cpu")


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


@functools.lru_cache(maxsize=8)
def pipeline(models_dir: str, checkpoint: str, class_name: str) -> object:
    """A diffusers pipeline class loaded from ``models_dir/checkpoint``."""
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(f"{models_dir}/{checkpoint}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_rgb(source: str | bytes) -> Image.Image:
    """An input image as the job reads it: EXIF-transposed, RGB."""
    from PIL import ImageOps

    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return ImageOps.exif_transpose(image).convert("RGB")


def hint_tensor(source: str | bytes) -> torch.Tensor:
    """A depth hint image -> (1, 3, H, W) in [0, 1], as diffusers' ControlNet docs build it."""
    pixels = np.asarray(load_rgb(source), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


def mode_reference(models_dir: str, row: dict, seed: int, *, hint: str | bytes | None = None) -> np.ndarray:
    """diffusers' single-process image for ``row`` (any mode / prior input) with one seeded generator.

    Combined pipelines for text2img / img2img / inpaint with the text prior; otherwise the prior
    pipeline (Prior, PriorEmb2Emb or Prior.interpolate) and then the row's decoder pipeline, both
    drawing from the same ``torch.Generator("cpu").manual_seed(seed)``. Image inputs of ``row`` are
    local paths or bytes.
    """
    from diffusers import KandinskyV22Img2ImgCombinedPipeline, KandinskyV22InpaintCombinedPipeline

    generator = torch.Generator("cpu").manual_seed(seed)
    mode = row.get("mode") or "text2img"
    p = {k: row[k] for k in ("height", "width", "num_inference_steps", "guidance_scale") if row.get(k) is not None}
    prior_p = {
        "num_inference_steps": row.get("prior_num_inference_steps") or 25,
        "guidance_scale": 4.0 if row.get("prior_guidance_scale") is None else row["prior_guidance_scale"],
    }
    strength = {"strength": row["strength"]} if row.get("strength") is not None else {}
    text_prior = not row.get("prior_image") and not row.get("interpolate")
    if text_prior and mode in ("img2img", "inpaint"):
        checkpoint = "decoder" if mode == "img2img" else "decoder-inpaint"
        decoder = pipeline(models_dir, checkpoint, "KandinskyV22Pipeline")
        prior = pipeline(models_dir, "prior", "KandinskyV22PriorPipeline")
        cls = KandinskyV22Img2ImgCombinedPipeline if mode == "img2img" else KandinskyV22InpaintCombinedPipeline
        pipe = cls(**decoder.components, **{f"prior_{k}": v for k, v in prior.components.items()})
        pipe.set_progress_bar_config(disable=True)
        extra = {"mask_image": Image.open(row["mask"])} if mode == "inpaint" else strength
        return np.asarray(
            pipe(
                prompt=row["prompt"],
                image=load_rgb(row["image"]),
                negative_prompt=row.get("negative_prompt"),
                generator=generator,
                prior_guidance_scale=prior_p["guidance_scale"],
                prior_num_inference_steps=prior_p["num_inference_steps"],
                **extra,
                **p,
            ).images[0]
        )
    if text_prior and mode == "text2img":
        return text2img_reference(models_dir, row, seed)

    prior = pipeline(models_dir, "prior", "KandinskyV22PriorPipeline")
    if row.get("interpolate"):
        items = [item.get("prompt") or load_rgb(item["image"]) for item in row["interpolate"]]
        out = prior.interpolate(
            items,
            [item["weight"] for item in row["interpolate"]],
            generator=generator,
            negative_prompt=row.get("negative_prompt") or "",
            **prior_p,
        )
    elif row.get("prior_image"):
        emb2emb = pipeline(models_dir, "prior", "KandinskyV22PriorEmb2EmbPipeline")
        out = emb2emb(
            prompt=row["prompt"],
            image=load_rgb(row["prior_image"]),
            strength=row.get("prior_strength") or 0.3,
            negative_prompt=row.get("negative_prompt"),
            generator=generator,
            **prior_p,
        )
    else:
        out = prior(prompt=row["prompt"], negative_prompt=row.get("negative_prompt"), generator=generator, **prior_p)
    embeds = {"image_embeds": out.image_embeds, "negative_image_embeds": out.negative_image_embeds}
    classes = {
        "text2img": ("decoder", "KandinskyV22Pipeline"),
        "img2img": ("decoder", "KandinskyV22Img2ImgPipeline"),
        "inpaint": ("decoder-inpaint", "KandinskyV22InpaintPipeline"),
        "controlnet": ("controlnet-depth", "KandinskyV22ControlnetPipeline"),
        "controlnet_img2img": ("controlnet-depth", "KandinskyV22ControlnetImg2ImgPipeline"),
    }
    decoder = pipeline(models_dir, *classes[mode])
    extra: dict = {}
    if mode in ("img2img", "inpaint", "controlnet_img2img"):
        extra["image"] = load_rgb(row["image"])
    if mode == "inpaint":
        extra["mask_image"] = Image.open(row["mask"])
    if mode in ("img2img", "controlnet_img2img"):
        extra.update(strength)
    if mode in ("controlnet", "controlnet_img2img"):
        extra["hint"] = hint_tensor(hint if hint is not None else row["hint"])
    return np.asarray(decoder(generator=generator, **embeds, **extra, **p).images[0])


def assert_close_to_reference(got: np.ndarray, expected: np.ndarray, *, what: object) -> None:
    """The job's image against diffusers' solo reference: every value within 2 levels, at most 0.1% beyond 1.

    Batched calls differ from solo calls by float effects (about 5e-5 in decoder latents); the tiny
    random MoVQ amplifies them, so a handful of values of an image that shared its decoder call can
    land 2 levels away, depending even on the reference process's allocation history (see README.md,
    Seeds and reproducibility). Same inputs and batch composition are still bitwise repeatable.
    """
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    levels = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert levels.max() <= 2 and (levels > 1).mean() <= 1e-3, (what, int(levels.max()), float((levels > 1).mean()))


def result_png(result: dict, *, storage_options: dict | None = None) -> bytes:
    """The PNG bytes of an ok results row, in any output format: the file, the tar member, or the parquet row."""
    import tarfile

    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(result["uri"], "rb", **(storage_options or {})) as handle:
        data = handle.read()
    if result["member"] is None:
        return data
    if result["uri"].endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return tar.extractfile(result["member"]).read()
    table = pq.read_table(io.BytesIO(data), columns=["key", "png"])
    (png,) = [row["png"] for row in table.to_pylist() if row["key"] == result["member"]]
    return png


def load_result(result: dict, *, storage_options: dict | None = None) -> np.ndarray:
    """Pixels of an ok results row, in any output format (`result_png`)."""
    with Image.open(io.BytesIO(result_png(result, storage_options=storage_options))) as image:
        return np.asarray(image.convert("RGB"))


def reference_cosines(prior: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per row, the cosine of its CLIP image and text embeddings: transformers called directly, one row at a time."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    tokenizer = CLIPTokenizer.from_pretrained(prior, subfolder="tokenizer")
    processor = CLIPImageProcessor.from_pretrained(prior, subfolder="image_processor")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(prior, subfolder="text_encoder").eval()
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(prior, subfolder="image_encoder").eval()
    cosines = {}
    with torch.no_grad():
        for row in rows:
            image = np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_height"], row["pixel_width"], 3)
            tokens = tokenizer(row["prompt"], truncation=True, max_length=77, return_tensors="pt")
            text_embeds = text_encoder(**tokens).text_embeds
            image_embeds = image_encoder(**processor(images=image, return_tensors="pt")).image_embeds
            cosines[row["id"]] = torch.nn.functional.cosine_similarity(image_embeds, text_embeds).item()
    return cosines
