"""Mode ``host``: the decoder actor's host time per image, its pipeline replaced by a stub that returns at once."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.common import Mode, machine, write_manifest


class Timed:
    """Wraps a function; adds the wall and this thread's CPU seconds of each call to ``wall`` and ``cpu``."""

    def __init__(self, function: Any) -> None:
        self.function, self.wall, self.cpu = function, 0.0, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.thread_time() - cpu


def _denormalize(images: Any) -> Any:
    """What diffusers 0.42.1's text2img pipeline does on the device for ``output_type="np"``."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if images.device.type == "cuda":
        import torch

        torch.cuda.synchronize(images.device)
    return images


class StubPipeline:
    """Stands in for a text2img decoder pipeline: returns a prepared device tensor at once.

    ``images``: (B, 3, H, W) in the model dtype on the device, the range of a raw MoVQ decode. For
    ``output_type="np"`` (the decoder before issue 18) it then does what diffusers 0.42.1's text2img
    pipeline does: ``device`` (`_denormalize`, timed), then ``.cpu()``, channels last, ``.float()``,
    numpy; for "pt" it returns the tensor as it is.
    """

    def __init__(self, pipe: Any, images: Any, *, device: Timed) -> None:
        self.unet, self.movq, self.scheduler = pipe.unet, pipe.movq, pipe.scheduler
        self.images, self.device = images, device

    def __call__(self, **kwargs: Any) -> tuple[Any]:
        images = self.images[: len(kwargs["image_embeds"])]
        if kwargs.get("output_type") == "np":
            images = self.device(images).cpu().permute(0, 2, 3, 1).float().numpy()
        return (images,)


def time_device_work(device: Timed) -> str:
    """Make ``device`` time the decoder's device-side image work inside its calls; returns which path that is.

    With `actors.pixels` (issue 18): ``start_copy`` (uint8 and the finite flags on the device, the
    copy started). Before it: the stub's `_denormalize` (the rest of diffusers' "np" path and
    `to_uint8` ran on the host). Only the benchmark's own process is changed.
    """
    import actors.decoder

    if not hasattr(actors.decoder, "start_copy"):
        return "np then to_uint8 on the host"
    device.function = actors.decoder.start_copy
    actors.decoder.start_copy = device
    return "uint8 on the device"


def run_host(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``host``: median milliseconds (CPU and wall) per image of the real `DecoderActor` call and its IPC.

    The decoder's rows come from the tiny prior (text2img, ``--size`` square); its pipeline is a
    `StubPipeline`, so what is timed is everything the actor does around the model: restoring the
    generators, moving the embeddings, making pixels, building the output table, then
    `schemas.work.to_ipc` as the Ray actor returns it. The device-side image work is timed inside the
    call (`time_device_work`) and, on a CPU device, taken out: there the CPU stands in for the GPU.
    """
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from jobs.dev.tiny_models import build_tiny_models
    from jobs.planning.run_plan import manifest_work
    from schemas.config import JobConfig
    from schemas.models import ModelPaths
    from schemas.work import to_ipc

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-host-"))
    models = args.models
    if not models:
        models = str(work_dir / "models")
        build_tiny_models(models)
    manifest = write_manifest(work_dir / "manifest.parquet", num_rows=args.batch_size, size=args.size, steps=2)
    config = JobConfig(
        manifest=manifest,
        output=str(work_dir / "out"),
        models=ModelPaths.resolve(models_dir=models),
        batch_size=args.batch_size,
    )
    embeds = PriorActor(f"{models}/prior", device="cpu")(manifest_work(config).batches.work)
    actor = DecoderActor(
        {"text2img": f"{models}/decoder"}, device=device, dtype=args.dtype, max_batch_size=args.batch_size
    )
    dtype = actor.pipes["text2img"].unet.dtype
    shape = (args.batch_size, 3, args.size, args.size)
    values = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # a raw decode's range
    images = values.to(device=device, dtype=dtype)
    device_work = Timed(_denormalize)
    actor.pipes["text2img"] = StubPipeline(actor.pipes["text2img"], images, device=device_work)
    path = time_device_work(device_work)
    for _ in range(2):  # warm-up: allocators, pinned memory, first-call paths
        to_ipc(actor(embeds))
    laps: dict[str, list[tuple[float, float]]] = {"stage": [], "ipc": [], "device": []}  # (cpu, wall) per call
    for _ in range(args.calls):
        device_work.cpu = device_work.wall = 0.0
        wall, cpu = time.perf_counter(), time.thread_time()
        table = actor(embeds)
        laps["stage"].append((time.thread_time() - cpu, time.perf_counter() - wall))
        laps["device"].append((device_work.cpu, device_work.wall))
        wall, cpu = time.perf_counter(), time.thread_time()
        to_ipc(table)
        laps["ipc"].append((time.thread_time() - cpu, time.perf_counter() - wall))
        errors = [e for e in table.column("error").to_pylist() if e is not None]
        if errors:
            raise RuntimeError(f"the stub call produced error rows: {errors[:2]}")
    n = args.batch_size
    figures = {
        f"{name}_{kind}_ms_per_image": 1000 * statistics.median(lap[k] for lap in values) / n
        for name, values in laps.items()
        for k, kind in enumerate(("cpu", "wall"))
    }
    # On the CPU the device-side work is host work too: it comes out of the host figure. On a GPU
    # it runs on the GPU, and the stage call's CPU time holds only what the host does.
    host_laps = [
        stage[0] + ipc[0] - (work[0] if device == "cpu" else 0.0)
        for stage, ipc, work in zip(laps["stage"], laps["ipc"], laps["device"])
    ]
    host_ms = 1000 * statistics.median(host_laps) / n
    stands_in = " (the CPU stands in for the GPU: it also does the device-side work)" if device == "cpu" else ""
    print(f"decoder host work, {path}: {n} images of {args.size}x{args.size} per call, {device}{stands_in}, {dtype}")
    for name, what in (
        ("stage", "stage call (DecoderActor(table), stub pipeline)"),
        ("ipc", "IPC (schemas.work.to_ipc, as the Ray actor returns it)"),
        ("device", "device-side image work, inside the stage call"),
    ):
        cpu, wall = figures[f"{name}_cpu_ms_per_image"], figures[f"{name}_wall_ms_per_image"]
        print(f"{what}: {cpu:.3f} ms CPU per image ({wall:.3f} ms wall)")
    print(f"host work per image: {host_ms:.3f} ms CPU (target <= 2 ms)")
    return {
        "mode": "host",
        "machine": {**machine(), "device": device},
        "path": path,
        "size": args.size,
        "batch_size": n,
        "calls": args.calls,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        **{key: round(value, 4) for key, value in figures.items()},
        "host_ms_per_image": round(host_ms, 4),
    }


def add_arguments(host: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark host``."""
    host.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    host.add_argument("--dtype", default="auto", help="model dtype (auto: float16 on CUDA, float32 on CPU)")
    host.add_argument("--size", type=int, default=768, help="height and width")
    host.add_argument("--batch-size", type=int, default=16, help="images per decoder call")
    host.add_argument("--calls", type=int, default=7, help="timed calls (the median is reported)")
    host.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    host.add_argument("--models", help="tiny models directory (default: build one in the work dir)")
    host.add_argument("--work-dir", help="scratch folder (default: a new temporary folder)")


MODES = (
    Mode(
        name="host",
        help="decoder actor host time per image around a stub pipeline (target <= 2 ms)",
        add_arguments=add_arguments,
        run=run_host,
        quiet_libraries=True,
    ),
)
