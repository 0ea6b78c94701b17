"""Mode ``score``: the CLIP scoring stage's cost per image relative to the decoder's, same process, same device."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.benchmarks.common import Mode, machine, write_manifest


def _device(args: argparse.Namespace) -> str:
    """The device to measure on; raises ValueError (exit status 2) unless CUDA, or ``--tiny --device cpu``."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"benchmark score: --device {device} but torch sees no CUDA device")
        return device
    if args.tiny and device == "cpu":
        return device
    raise ValueError(
        "benchmark score needs a CUDA device for the real-size models "
        "(or --tiny --device cpu for a dry run on the tiny models)"
    )


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _models(args: argparse.Namespace, *, device: str, work_dir: Path) -> tuple[str, str]:
    """(directory holding prior/ and decoder/, what they are)."""
    from jobs.dev.real_size import build_real_size_models
    from jobs.dev.tiny_models import build_tiny_models

    if args.models:
        return args.models, args.models
    if args.tiny:  # MoVQ scale 8, the real one: 768x768 outputs stay cheap on a CPU
        build_tiny_models(str(work_dir / "models"), movq_scale_factor=8)
        return str(work_dir / "models"), "tiny"
    # real-size checkpoints are written and read back once: RAM-backed /dev/shm when it exists (as gpu does)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    models_dir = Path(tempfile.mkdtemp(prefix="kandinsky-score-models-", dir=shm))
    return build_real_size_models(models_dir, device=device), "real-size, random weights"


def with_random_embeddings(work: pa.Table, *, dim: int, seed: int = 0) -> pa.Table:
    """``work`` as the prior would hand it on, with seeded standard-normal embeddings instead of the prior's."""
    from actors.common import generator_state, seeded_generator
    from schemas.work import embed_fields, embed_schema, embeds_array

    n = work.num_rows
    rng = np.random.default_rng(seed)
    columns = [
        embeds_array(rng.standard_normal((n, dim), np.float32), num_rows=n, dim=dim),
        embeds_array(rng.standard_normal((n, dim), np.float32), num_rows=n, dim=dim),
        pa.array([generator_state(seeded_generator(s)) for s in work.column("seed").to_pylist()], pa.binary()),
        pa.array(["random embeddings"] * n, pa.string()),
        pa.nulls(n, pa.float64()),
    ]
    for field, column in zip(embed_fields(dim), columns):
        work = work.append_column(field, column)
    return work.cast(embed_schema(dim))


def _per_image(seconds: float, images: int) -> float:
    return seconds / max(images, 1)


def _timed_calls(stage: Any, tables: list[pa.Table], *, device: str) -> tuple[list[pa.Table], list[float]]:
    """``stage`` over each table, one call each: the outputs and each call's wall seconds."""
    outputs, seconds = [], []
    for table in tables:
        _synchronize(device)
        t0 = time.perf_counter()
        outputs.append(stage(table))
        _synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return outputs, seconds


def _breakdown(scorer: Any, tables: list[pa.Table], *, device: str) -> dict[str, float]:
    """Seconds per image of each part of a scoring call, run apart on the same rows, plus the pixels copy avoided."""
    import torch

    from schemas.work import binary_views

    parts = {"preprocess": 0.0, "text_encoder": 0.0, "image_encoder": 0.0, "pixels_copy": 0.0}
    images = 0
    with torch.inference_mode():
        for table in tables:
            rows = table.drop_columns(["pixels"]).to_pylist()
            served = [i for i, row in enumerate(rows) if row["error"] is None and row["prompt"] is not None]
            if not served:
                continue
            views = binary_views(table.column("pixels"))
            pixels = [views[i].reshape(rows[i]["pixel_height"], rows[i]["pixel_width"], 3) for i in served]
            images += len(served)
            t0 = time.perf_counter()
            text = scorer.tokenizer(
                [rows[i]["prompt"] for i in served],
                padding=True,
                truncation=True,
                max_length=scorer.max_length,
                return_tensors="pt",
            )
            values = scorer.processor(images=pixels, input_data_format="channels_last", return_tensors="pt")
            values = values["pixel_values"].to(scorer.device, scorer.dtype)
            _synchronize(device)
            t1 = time.perf_counter()
            scorer.text_encoder(
                input_ids=text["input_ids"].to(scorer.device), attention_mask=text["attention_mask"].to(scorer.device)
            )
            _synchronize(device)
            t2 = time.perf_counter()
            scorer.image_encoder(pixel_values=values)
            _synchronize(device)
            t3 = time.perf_counter()
            table.to_pylist()  # what the Stage base would copy without buffer_columns ...
            t4 = time.perf_counter()
            table.drop_columns(["pixels"]).to_pylist()  # ... less what it copies anyway
            t5 = time.perf_counter()
            parts["preprocess"] += t1 - t0
            parts["text_encoder"] += t2 - t1
            parts["image_encoder"] += t3 - t2
            parts["pixels_copy"] += max((t4 - t3) - (t5 - t4), 0.0)
    return {name: _per_image(seconds, images) for name, seconds in parts.items()}


def run_score(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``score``: decoder and scorer seconds per image, timed in this process on one device, and their ratio."""
    device = _device(args)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-score-bench-"))
    started = time.perf_counter()
    models, kind = _models(args, device=device, work_dir=work_dir)
    build_seconds = time.perf_counter() - started
    try:
        return _measure(args, device=device, models=models, kind=kind, work_dir=work_dir) | {
            "build_seconds": round(build_seconds, 1)
        }
    finally:
        if not args.models and not args.tiny:  # ~10 GB of real-size checkpoints, in RAM when in /dev/shm
            shutil.rmtree(models, ignore_errors=True)


def _measure(args: argparse.Namespace, *, device: str, models: str, kind: str, work_dir: Path) -> dict[str, Any]:
    """Both stages timed on ``models``; the mode's figures."""
    import torch

    from actors.common import resolve_dtype
    from actors.decoder import DecoderActor
    from actors.scorer import ScoreActor
    from jobs.planning.run_plan import manifest_work
    from schemas.accel import AccelOptions
    from schemas.config import JobConfig
    from schemas.models import ModelPaths

    size, steps = args.size, args.steps
    dtype = str(resolve_dtype(args.dtype, torch.device(device))).removeprefix("torch.")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"models ready ({kind}); device {device}, {dtype}, {threads} torch CPU threads", flush=True)
    batch, timed = args.batch_size, args.timed_batches
    num_rows = batch * (timed + 1)  # the first batch warms both stages up
    manifest = write_manifest(work_dir / "manifest.parquet", num_rows=num_rows, size=size, steps=steps)
    paths = ModelPaths.resolve(models_dir=models)
    config = JobConfig(manifest=manifest, output=str(work_dir / "unused"), models=paths, batch_size=batch)
    work = manifest_work(config).batches.work
    accel = AccelOptions(channels_last=args.channels_last)

    t0 = time.perf_counter()
    decoder = DecoderActor(
        {"text2img": f"{models}/decoder"}, dtype=dtype, device=device, accel=accel, max_batch_size=batch, worker="bench"
    )
    decoder_load = time.perf_counter() - t0
    embeds = with_random_embeddings(work, dim=int(decoder.pipes["text2img"].unet.config.encoder_hid_dim))
    batches = [embeds.slice(k * batch, batch) for k in range(timed + 1)]
    decoded, _ = _timed_calls(decoder, batches[:1], device=device)  # warm-up
    timed_decoded, decoder_calls = _timed_calls(decoder, batches[1:], device=device)
    decoded += timed_decoded
    decoder_seconds = _per_image(float(np.median(decoder_calls)), batch)
    decoder_errors = sum(table.num_rows - table.column("error").null_count for table in decoded)
    print(f"decoder stage ({size}x{size}, {steps} steps, batch {batch}): {decoder_seconds * 1000:.1f} ms per image")
    del decoder

    t0 = time.perf_counter()
    scorer = ScoreActor(f"{models}/prior", dtype=dtype, device=device, accel=accel, worker="bench")
    score_load = time.perf_counter() - t0
    _timed_calls(scorer, decoded[:1], device=device)  # warm-up
    scored, score_calls = _timed_calls(scorer, decoded[1:], device=device)
    score_seconds = _per_image(float(np.median(score_calls)), batch)
    ratio = score_seconds / decoder_seconds
    print(f"score stage (batch {batch}): {score_seconds * 1000:.2f} ms per image = {ratio:.2%} of the decoder's")
    calls = {name: " ".join(f"{s:.4f}" for s in values) for name, values in (("d", decoder_calls), ("s", score_calls))}
    print(f"  (median of {timed} calls each; call seconds: decoder {calls['d']}; score {calls['s']})")
    parts = _breakdown(scorer, decoded[1:], device=device)
    print(
        "  of which, run apart: preprocessing {preprocess} ms, text encoder {text_encoder} ms, "
        "image encoder {image_encoder} ms per image".format(**{k: f"{v * 1000:.2f}" for k, v in parts.items()})
    )
    print(f"  the pixels copy buffer_columns avoids: {parts['pixels_copy'] * 1000:.3f} ms per image")
    print(f"one scorer keeps up with {1 / ratio:.1f} decoders at this setting ({ratio:.3f} of a device per decoder)")
    scores = [s for table in scored for s in table.column("clip_score").to_pylist()]
    return {
        "mode": "score",
        "machine": {**machine(), "device": _device_name(device)},
        "models": kind,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "size": size,
        "steps": steps,
        "batch_size": batch,
        "timed_images": batch * timed,
        # per image: the median call's seconds / batch size (robust to a neighbour taking a core for one call)
        "decoder_seconds_per_image": round(decoder_seconds, 6),
        "score_seconds_per_image": round(score_seconds, 6),
        "decoder_call_seconds": [round(s, 5) for s in decoder_calls],
        "score_call_seconds": [round(s, 5) for s in score_calls],
        "score_to_decoder_ratio": round(ratio, 5),
        "decoders_per_scorer": round(1 / ratio, 2),
        "score_parts_seconds_per_image": {name: round(seconds, 6) for name, seconds in parts.items()},
        "scored": sum(s is not None for s in scores),
        "errors": decoder_errors + sum(table.num_rows - table.column("error").null_count for table in scored),
        "load_seconds": {"decoder": round(decoder_load, 2), "score": round(score_load, 2)},
    }


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device


def add_arguments(score: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark score``."""
    score.add_argument("--device", help="torch device (none: cuda; cpu only with --tiny)")
    score.add_argument("--tiny", action="store_true", help="tiny test models instead of real-size ones")
    score.add_argument("--models", help="checkpoints to use (DIR/prior, DIR/decoder) instead of building them")
    score.add_argument(
        "--dtype",
        choices=("auto", "float16", "bfloat16", "float32"),
        default="auto",
        help="auto: float16 on CUDA, float32 on the CPU",
    )
    score.add_argument("--size", type=int, default=768, help="height and width of the decoded images")
    score.add_argument("--steps", type=int, default=50, help="decoder steps")
    score.add_argument("--batch-size", type=int, default=4, help="rows per decoder call and per scoring call")
    score.add_argument("--timed-batches", type=int, default=2, help="timed calls of each stage, after one warm-up")
    score.add_argument("--threads", type=int, help="torch CPU threads (none: torch's default; 1 on a shared CPU)")
    score.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC weights")
    score.add_argument("--work-dir", help="where the manifest and tiny models go (none: a new temp dir)")


MODES = (
    Mode(
        name="score",
        help="CLIP scoring stage cost per image relative to the decoder's",
        add_arguments=add_arguments,
        run=run_score,
        quiet_libraries=True,
    ),
)
