"""Build deterministic tiny random-weight Kandinsky 2.2 checkpoints (and a tiny DPT depth model) offline."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from jobs.dev.tokenizer import write_clip_tokenizer
from schemas.loggers import logger_for
from schemas.models import cache_root

logger = logger_for(__name__)

if TYPE_CHECKING:
    import torch
    from diffusers import DDPMScheduler, UnCLIPScheduler

# torch is imported where models are built: checking an existing build (the example's every run) needs none.
ModelT = TypeVar("ModelT", bound="torch.nn.Module")

MARKER = ".complete"
COMPONENTS = ("prior", "decoder", "decoder-inpaint", "controlnet-depth", "depth")
MOVQ_SCALE_FACTORS = (2, 8)

EMBED_DIM = 32  # CLIP hidden/projection size == prior embedding size == UNet encoder_hid_dim
# Per-component seed offsets: fixed forever so a given seed always yields the same bytes.
SEED_OFFSETS = {"prior": 0, "image_encoder": 1, "text_encoder": 2, "unet": 3, "unet-inpaint": 4,
                "unet-controlnet": 5, "movq": 6, "depth": 7}  # fmt: skip


def _seeded(factory: Callable[[], ModelT], *, seed: int, key: str) -> ModelT:
    """Return ``factory()`` built on CPU right after seeding torch with ``seed`` plus ``key``'s offset."""
    import torch

    torch.manual_seed(seed + SEED_OFFSETS[key])
    with torch.device("cpu"):
        return factory().eval()


def _build_prior(dest: Path, *, seed: int, scratch: Path) -> None:
    """Save a KandinskyV22PriorPipeline (also loadable as KandinskyV22PriorEmb2EmbPipeline) to ``dest``."""
    import torch
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tok_dir = scratch / "tokenizer-src"
    vocab_size = write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))

    def make_prior() -> PriorTransformer:
        prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM, num_layers=1)
        # clip_mean/clip_std start as zeros; std 0 makes post_process_latents return all zeros.
        with torch.no_grad():
            prior.clip_std.fill_(1.0)
        return prior

    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=EMBED_DIM,
        projection_dim=EMBED_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=EMBED_DIM,
        projection_dim=EMBED_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        image_size=224,
        patch_size=14,
        num_channels=3,
    )
    image_processor = CLIPImageProcessor(
        crop_size=224,
        size=224,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    pipe = KandinskyV22PriorPipeline(
        prior=_seeded(make_prior, seed=seed, key="prior"),
        image_encoder=_seeded(lambda: CLIPVisionModelWithProjection(vision_config), seed=seed, key="image_encoder"),
        text_encoder=_seeded(lambda: CLIPTextModelWithProjection(text_config), seed=seed, key="text_encoder"),
        tokenizer=tokenizer,
        scheduler=prior_scheduler(),
        image_processor=image_processor,
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    # transformers 5 saves only tokenizer.json plus a config with load-time keys; ship the hand-written
    # vocab.json/merges.txt instead, the real checkpoint's layout.
    shutil.rmtree(dest / "tokenizer")
    write_clip_tokenizer(dest / "tokenizer")
    # Without torchvision the processor is CLIPImageProcessorPil; record the class the real checkpoint
    # names, which loads on either backend.
    index_path = dest / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def prior_scheduler() -> UnCLIPScheduler:
    """The prior's scheduler, configured like the real kandinsky-2-2-prior."""
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )


def decoder_scheduler() -> DDPMScheduler:
    """DDPMScheduler configured like kandinsky-community/kandinsky-2-2-decoder (draws step noise)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        clip_sample_range=1.0,
        prediction_type="epsilon",
        variance_type="fixed_small",
        steps_offset=1,
        timestep_spacing="leading",
        thresholding=False,
        sample_max_value=1.0,
        dynamic_thresholding_ratio=0.995,
    )


def _movq_kwargs(movq_scale_factor: int) -> dict[str, object]:
    """VQModel (MoVQ) config whose spatial scale factor is ``movq_scale_factor``."""
    blocks = {2: [32, 64], 8: [32, 32, 64, 64]}.get(movq_scale_factor)
    if blocks is None:
        raise ValueError(f"movq_scale_factor must be one of {MOVQ_SCALE_FACTORS}, got {movq_scale_factor!r}")
    # Attention only in the innermost block, as in diffusers' test MoVQ.
    down = ["DownEncoderBlock2D"] * (len(blocks) - 1) + ["AttnDownEncoderBlock2D"]
    up = ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (len(blocks) - 1)
    return {
        "block_out_channels": blocks,
        "down_block_types": down,
        "up_block_types": up,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "norm_type": "spatial",
        "num_vq_embeddings": 12,
        "vq_embed_dim": 4,
    }


def _unet(*, in_channels: int, addition_embed_type: str, cross_attention_dim: int) -> torch.nn.Module:
    """Decoder UNet2DConditionModel from diffusers' Kandinsky 2.2 test configuration."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=8,  # noise + variance like the real UNet; fixed-variance schedulers use the first 4
        addition_embed_type=addition_embed_type,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )


def _build_decoder(dest: Path, *, kind: str, seed: int, movq_scale_factor: int) -> None:
    """Save the ``kind`` decoder ("decoder", "decoder-inpaint" or "controlnet-depth") pipeline to ``dest``."""
    from diffusers import (
        KandinskyV22ControlnetPipeline,
        KandinskyV22InpaintPipeline,
        KandinskyV22Pipeline,
        VQModel,
    )

    pipeline_cls, unet_key, in_channels, embed_type, cross_dim = {
        "decoder": (KandinskyV22Pipeline, "unet", 4, "image", EMBED_DIM),
        "decoder-inpaint": (KandinskyV22InpaintPipeline, "unet-inpaint", 9, "image", EMBED_DIM),
        "controlnet-depth": (KandinskyV22ControlnetPipeline, "unet-controlnet", 8, "image_hint", 100),
    }[kind]
    # The UNet's image_hint block downsamples the hint by a fixed 8, so the hint (output-sized) only matches
    # the latents when the MoVQ scale is 8, as in the real checkpoint.
    movq_kwargs = _movq_kwargs(8 if kind == "controlnet-depth" else movq_scale_factor)
    pipe = pipeline_cls(
        unet=_seeded(
            lambda: _unet(in_channels=in_channels, addition_embed_type=embed_type, cross_attention_dim=cross_dim),
            seed=seed,
            key=unet_key,
        ),
        scheduler=decoder_scheduler(),
        # Same seed key for every decoder: equal MoVQ configs get equal weights, as in the real checkpoints.
        movq=_seeded(lambda: VQModel(**movq_kwargs), seed=seed, key="movq"),
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)


def _build_depth(dest: Path, *, seed: int) -> None:
    """Save a tiny DPTForDepthEstimation plus DPTImageProcessor for ``pipeline("depth-estimation")``."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_channels=3,
        is_hybrid=False,
        backbone_out_indices=[0, 1],
        reassemble_factors=[2, 1],
        neck_hidden_sizes=[16, 32],
        fusion_hidden_size=16,
        head_in_index=-1,
        use_auxiliary_head=False,
    )
    model = _seeded(lambda: DPTForDepthEstimation(config), seed=seed, key="depth")
    model.save_pretrained(str(dest), safe_serialization=True)
    processor = DPTImageProcessor(
        do_resize=True,
        size={"height": 32, "width": 32},
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=False,
    )
    processor.save_pretrained(str(dest))


def default_tiny_models_dir() -> str:
    """Where ``--example`` keeps its tiny models: ``$KANDINSKY_RENDER_CACHE/tiny-models``.

    ``KANDINSKY_RENDER_CACHE`` defaults to ``~/.cache/kandinsky-render``.
    """
    return os.path.join(cache_root(), "tiny-models")


def _paths(root: Path) -> dict[str, str]:
    """Component name -> path of its checkpoint under ``root``."""
    return {name: str(root / name) for name in COMPONENTS}


def _read_marker(root: Path) -> dict[str, object] | None:
    """The build arguments recorded in ``root``'s marker, or None if ``root`` is not a complete build."""
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def build_tiny_models(
    out_dir: str, *, seed: int = 0, movq_scale_factor: int = 2, overwrite: bool = False
) -> dict[str, str]:
    """Build tiny random-weight Kandinsky 2.2 checkpoints under ``out_dir`` and return their paths.

    Writes ``prior/``, ``decoder/``, ``decoder-inpaint/``, ``controlnet-depth/`` (diffusers
    ``save_pretrained`` layouts) and ``depth/`` (transformers DPT depth-estimation model) plus a
    ``.complete`` marker recording ``seed`` and ``movq_scale_factor``. ``movq_scale_factor`` (2 or 8)
    sets the MoVQ of ``decoder`` and ``decoder-inpaint``; ``controlnet-depth`` always has scale 8
    because its UNet downsamples the output-sized hint by 8. The same arguments always give
    byte-identical files (for given torch/diffusers/transformers versions). Everything is built in a
    sibling temp dir and renamed into place, so ``out_dir`` is either absent or complete. If ``out_dir``
    is already complete with the same arguments and ``overwrite`` is false, nothing is written.
    Raises ``ValueError`` for a ``movq_scale_factor`` other than 2 or 8, and ``FileExistsError`` when
    ``out_dir`` holds anything else and ``overwrite`` is false. Returns absolute paths keyed by
    component name (``COMPONENTS``).
    """
    _movq_kwargs(movq_scale_factor)  # validate before touching the disk
    root = Path(out_dir).absolute()
    params = {"seed": seed, "movq_scale_factor": movq_scale_factor}
    if not overwrite and root.exists():
        found = _read_marker(root)
        if found == params:
            return _paths(root)
        if found is not None or any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists and is not a tiny-model dir built with {params}; pass overwrite=True to replace it"
            )
    from actors.common import quiet_libraries

    quiet_libraries()  # no "Writing model shards" bars, no library notices about the models being random
    logger.info("building tiny random-weight models in %s (once; later runs reuse them)", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        scratch = tmp / ".scratch"
        _build_prior(tmp / "prior", seed=seed, scratch=scratch)
        for kind in ("decoder", "decoder-inpaint", "controlnet-depth"):
            _build_decoder(tmp / kind, kind=kind, seed=seed, movq_scale_factor=movq_scale_factor)
        _build_depth(tmp / "depth", seed=seed)
        shutil.rmtree(scratch)
        (tmp / MARKER).write_text(json.dumps(params) + "\n", encoding="utf-8")
        _install(tmp, root, params, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


def _install(tmp: Path, root: Path, params: dict[str, object], *, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``root``, moving any old ``root`` aside first."""
    old = None
    if not overwrite and _read_marker(root) == params:
        return  # a concurrent builder finished first; same arguments mean the same bytes
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.rename(root, old / "d")
    try:
        os.rename(tmp, root)
    except OSError:
        # A concurrent builder won the race in between; accept its result if it matches.
        if overwrite or _read_marker(root) != params:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.dev.tiny_models") -> int:
    """CLI: ``kandinsky-render tiny-models DIR [--seed N] [--movq-scale-factor {2,8}] [--overwrite]``; prints paths."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("out_dir", metavar="DIR", help="directory to build the tiny checkpoints in")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--movq-scale-factor",
        type=int,
        choices=MOVQ_SCALE_FACTORS,
        default=2,
        help="MoVQ spatial scale factor: 2 (fastest) or 8 (the real one) (default 2)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if DIR is already complete")
    args = parser.parse_args(argv)
    try:
        paths = build_tiny_models(
            args.out_dir, seed=args.seed, movq_scale_factor=args.movq_scale_factor, overwrite=args.overwrite
        )
    except FileExistsError as exc:
        print(f"tiny-models: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
