"""Tests for jobs.dev.tiny_models: offline tiny Kandinsky 2.2 checkpoints that load, run and are deterministic."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch

from jobs.dev import tiny_models
from jobs.dev.tiny_models import COMPONENTS, build_tiny_models, main


@pytest.fixture(scope="session")
def models(tiny_models: str) -> dict[str, str]:
    """The session's tiny models (`tests/conftest.py`): a finished folder is reused, not built again."""
    return build_tiny_models(tiny_models)


@pytest.fixture(scope="session")
def prior(models: dict[str, str]) -> object:
    from diffusers import KandinskyV22PriorPipeline

    return KandinskyV22PriorPipeline.from_pretrained(models["prior"])


@pytest.fixture(scope="session")
def embeds(prior: object) -> tuple[torch.Tensor, torch.Tensor]:
    out = prior("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    return out.image_embeds, out.negative_image_embeds


def _file_bytes(root: str) -> dict[str, bytes]:
    base = Path(root)
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_layout(models: dict[str, str]) -> None:
    assert list(models) == list(COMPONENTS)
    root = Path(models["prior"]).parent
    assert json.loads((root / ".complete").read_text()) == {"seed": 0, "movq_scale_factor": 2}
    assert sorted(p.name for p in root.iterdir()) == sorted([*COMPONENTS, ".complete"])
    tok = Path(models["prior"]) / "tokenizer"
    assert sorted(p.name for p in tok.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert (tok / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert json.loads((tok / "tokenizer_config.json").read_text())["model_max_length"] == 77
    vocab = json.loads((tok / "vocab.json").read_text())
    text_config = json.loads((Path(models["prior"]) / "text_encoder" / "config.json").read_text())
    assert vocab["<|endoftext|>"] == max(vocab.values()) == text_config["vocab_size"] - 1
    assert "<|startoftext|>" in vocab and len(vocab) == text_config["vocab_size"]


def test_all_pipelines_load(models: dict[str, str]) -> None:
    import diffusers

    loads = {
        "prior": ["KandinskyV22PriorPipeline", "KandinskyV22PriorEmb2EmbPipeline"],
        "decoder": ["KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline"],
        "decoder-inpaint": ["KandinskyV22InpaintPipeline"],
        "controlnet-depth": ["KandinskyV22ControlnetPipeline", "KandinskyV22ControlnetImg2ImgPipeline"],
    }
    for name, classes in loads.items():
        for cls_name in classes:
            pipe = getattr(diffusers, cls_name).from_pretrained(models[name])
            assert type(pipe).__name__ == cls_name
    unet_config = json.loads((Path(models["controlnet-depth"]) / "unet" / "config.json").read_text())
    assert (unet_config["in_channels"], unet_config["addition_embed_type"]) == (8, "image_hint")
    assert unet_config["cross_attention_dim"] == 100


def test_tokenizer_and_text_embeddings_distinguish_prompts(prior: object) -> None:
    tok, enc = prior.tokenizer, prior.text_encoder
    ids = [
        tok(p, padding="max_length", max_length=77, return_tensors="pt").input_ids
        for p in ("a red cat", "a blue dog on the moon")
    ]
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert all(x.shape == (1, 77) for x in ids)
    assert not torch.equal(ids[0], ids[1])
    assert int((ids[1][0] != eos).sum()) > 5  # real tokens, not all unknown
    with torch.no_grad():
        embs = [enc(x).text_embeds for x in ids]
    assert not torch.allclose(embs[0], embs[1])
    a = prior("a red cat", num_inference_steps=2, generator=_gen()).image_embeds
    b = prior("a blue dog on the moon", num_inference_steps=2, generator=_gen()).image_embeds
    assert a.shape == (1, 32) and a.abs().sum() > 0 and not torch.allclose(a, b)


def test_same_seed_is_byte_identical_and_seeds_differ(models: dict[str, str], tmp_path: Path) -> None:
    again = build_tiny_models(str(tmp_path / "again"))
    for name in COMPONENTS:
        assert _file_bytes(again[name]) == _file_bytes(models[name]), name
    other = build_tiny_models(str(tmp_path / "other"), seed=1)
    for name in COMPONENTS:
        for rel, data in _file_bytes(other[name]).items():
            if rel.endswith(".safetensors"):
                assert data != _file_bytes(models[name])[rel], (name, rel)


def test_combined_pipeline_renders_deterministically(models: dict[str, str]) -> None:
    import os

    import torch

    from jobs.dev.reference import combined_pipeline

    pipe = combined_pipeline(os.path.dirname(models["prior"]), dtype=torch.float32, device="cpu")

    def render(seed: int) -> np.ndarray:
        return pipe(
            "a red cat",
            prior_num_inference_steps=2,
            num_inference_steps=2,
            height=64,
            width=64,
            generator=_gen(seed),
            output_type="np",
        ).images

    first, second, other = render(0), render(0), render(1)
    assert first.shape == (1, 64, 64, 3)
    assert first.std() > 0.01
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_inpaint_and_controlnet_run(models: dict[str, str], embeds: tuple[torch.Tensor, torch.Tensor]) -> None:
    from diffusers import KandinskyV22ControlnetPipeline, KandinskyV22InpaintPipeline

    emb, neg = embeds
    image = PIL.Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), np.float32)
    mask[:32] = 1
    inpaint = KandinskyV22InpaintPipeline.from_pretrained(models["decoder-inpaint"])
    out = inpaint(
        image=image,
        mask_image=mask,
        image_embeds=emb,
        negative_image_embeds=neg,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=_gen(),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0.01
    controlnet = KandinskyV22ControlnetPipeline.from_pretrained(models["controlnet-depth"])
    out = controlnet(
        image_embeds=emb,
        negative_image_embeds=neg,
        hint=torch.rand(1, 3, 64, 64, generator=_gen()),
        height=64,
        width=64,
        num_inference_steps=2,
        generator=_gen(),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0.01


def test_depth_pipeline_returns_input_sized_depth(models: dict[str, str]) -> None:
    from transformers import pipeline

    depth = pipeline("depth-estimation", model=models["depth"])
    image = PIL.Image.fromarray((np.random.RandomState(1).rand(70, 130, 3) * 255).astype(np.uint8))
    out = depth(image)
    assert set(out) == {"predicted_depth", "depth"}
    assert isinstance(out["depth"], PIL.Image.Image) and out["depth"].size == (130, 70)
    assert np.asarray(out["depth"]).std() > 0


def test_movq_scale_factor_8(models: dict[str, str], tmp_path: Path, embeds: tuple[torch.Tensor, torch.Tensor]) -> None:
    from diffusers import KandinskyV22Pipeline

    paths = build_tiny_models(str(tmp_path / "m8"), movq_scale_factor=8)
    dec = KandinskyV22Pipeline.from_pretrained(paths["decoder"])
    assert dec.movq_scale_factor == 8
    out = dec(
        image_embeds=embeds[0],
        negative_image_embeds=embeds[1],
        height=64,
        width=64,
        num_inference_steps=2,
        generator=_gen(),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0.01
    # The scale factor changes only the MoVQ of decoder and decoder-inpaint.
    for name in ("prior", "controlnet-depth", "depth"):
        assert _file_bytes(paths[name]) == _file_bytes(models[name]), name


def test_bad_scale_factor_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="movq_scale_factor"):
        build_tiny_models(str(tmp_path / "bad"), movq_scale_factor=4)
    assert not (tmp_path / "bad").exists()


def test_existing_complete_dir_is_reused(models: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(models["prior"]).parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    start = time.monotonic()
    assert build_tiny_models(str(root)) == models
    assert main([str(root)]) == 0
    assert time.monotonic() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert capsys.readouterr().out.split() == [x for name in COMPONENTS for x in (name, models[name])]
    with pytest.raises(FileExistsError):
        build_tiny_models(str(root), seed=5)
    assert main([str(root), "--seed", "5"]) == 1


def test_foreign_dir_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "models"
    target.mkdir()
    (target / "junk.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_models(str(target))
    paths = build_tiny_models(str(target), overwrite=True)
    assert not (target / "junk.txt").exists() and all(Path(p).is_dir() for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no temp dirs left behind


def test_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(dest: Path, *, seed: int) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(tiny_models, "_build_depth", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_tiny_models(str(tmp_path / "models"))
    assert list(tmp_path.iterdir()) == []
