"""Random-weight models of the real Kandinsky 2.2 architectures (real sizes), for benchmarks and size checks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def real_size_configs() -> dict[str, dict[str, Any]]:
    """Architecture configs of the public Kandinsky 2.2 checkpoints (as their config.json files give them).

    Parameter counts on the meta device: UNet 1.253 B, MoVQ 68 M, prior transformer 1.03 B, CLIP
    ViT-bigG/14 image encoder 1.84 B, text encoder 0.69 B (tests/test_benchmark.py checks them).
    """
    return {
        "unet": {
            "in_channels": 4,
            "out_channels": 8,
            "addition_embed_type": "image",
            "addition_embed_type_num_heads": 64,
            "attention_head_dim": 64,
            "block_out_channels": (384, 768, 1152, 1536),
            "cross_attention_dim": 768,
            "down_block_types": (
                "ResnetDownsampleBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
                "SimpleCrossAttnDownBlock2D",
            ),
            "encoder_hid_dim": 1280,
            "encoder_hid_dim_type": "image_proj",
            "layers_per_block": 3,
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "resnet_time_scale_shift": "scale_shift",
            "up_block_types": (
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "SimpleCrossAttnUpBlock2D",
                "ResnetUpsampleBlock2D",
            ),
        },
        "movq": {
            "block_out_channels": (128, 256, 256, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
            "up_block_types": ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "norm_type": "spatial",
            "num_vq_embeddings": 16384,
            "vq_embed_dim": 4,
            "sample_size": 32,
        },
        "prior": {
            "num_attention_heads": 32,
            "attention_head_dim": 64,
            "num_layers": 20,
            "embedding_dim": 1280,
            "num_embeddings": 77,
            "additional_embeddings": 4,
        },
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
        },
        "image_encoder": {
            "hidden_size": 1664,
            "intermediate_size": 8192,
            "num_attention_heads": 16,
            "num_hidden_layers": 48,
            "projection_dim": 1280,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu",
        },
    }


def build_real_size_modules(device: str) -> dict[str, Any]:
    """Random-weight modules of the real architectures, built directly on ``device`` (``meta``: no memory)."""
    import torch
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from jobs.dev.tokenizer import write_clip_tokenizer

    configs = real_size_configs()
    with tempfile.TemporaryDirectory() as scratch:
        vocab_size = write_clip_tokenizer(Path(scratch))
    torch.manual_seed(0)
    with torch.device(device):
        modules = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "movq": VQModel(**configs["movq"]),
            "prior": PriorTransformer(**configs["prior"]),
            # token ids come from the small offline tokenizer: its end token is the pooling position
            "text_encoder": CLIPTextModelWithProjection(
                CLIPTextConfig(**configs["text_encoder"], eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2)
            ),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**configs["image_encoder"])),
        }
    if device != "meta":
        with torch.no_grad():
            modules["prior"].clip_std.fill_(1.0)  # zeros (the default) make the prior output zeros
    return modules


def build_real_size_models(out_dir: Path, *, device: str) -> str:
    """Save real-size random-weight prior/ and decoder/ checkpoints (fp16) under ``out_dir``."""
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from jobs.dev.tiny_models import decoder_scheduler, prior_scheduler
    from jobs.dev.tokenizer import write_clip_tokenizer

    modules = {name: m.to(torch.float16).eval() for name, m in build_real_size_modules(device).items()}
    write_clip_tokenizer(out_dir / "tokenizer")
    prior = KandinskyV22PriorPipeline(
        prior=modules["prior"],
        image_encoder=modules["image_encoder"],
        text_encoder=modules["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(str(out_dir / "tokenizer")),
        scheduler=prior_scheduler(),
        image_processor=CLIPImageProcessor(crop_size=224, size=224),
    )
    prior.save_pretrained(str(out_dir / "prior"))
    decoder = KandinskyV22Pipeline(unet=modules["unet"], scheduler=decoder_scheduler(), movq=modules["movq"])
    decoder.save_pretrained(str(out_dir / "decoder"))
    del prior, decoder, modules
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(out_dir)
