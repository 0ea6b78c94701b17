"""``benchmark gpu``'s co-located phase: a CLIP actor (the prior) and a decoder on one GPU, as the co-located layout
places them, measured against each alone: the co-location efficiency `cluster.layout` assumes (0.9) or not."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.gpu_phases import Bench

MPS_NOTE = (
    "both actors run as threads of this one process, so they share one CUDA context and MPS cannot change this "
    "phase's figures; in a job they are two processes, which time-slice the GPU unless an MPS daemon runs. This "
    "benchmark does not start one: it must run before any process on the GPU initialises CUDA, and it outlives "
    "the run"
)


def mps_status() -> str:
    """``active`` (an MPS control daemon answers), ``available, not started``, or ``not available``."""
    pipes = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if (pipes / "control").exists():
        return "active"
    return "available, not started" if shutil.which("nvidia-cuda-mps-control") else "not available"


def co_located_phase(bench: Bench) -> dict[str, Any]:
    """A `PriorActor` and an eager `DecoderActor` (``--batch-size`` rows per call each) in this process on one
    device: each alone, then both at once (the prior calling in a thread for as long as the decoder makes
    ``--colocated-calls`` calls), on the device's one stream and on a stream each. Reports each one's images/s alone
    and beside the other, and the efficiency: the sum of the two shares of their alone speed (1: no loss)."""
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from cluster.layout import COLOCATION_EFFICIENCY
    from schemas.accel import AccelOptions

    args, batch, device = bench.args, bench.args.batch_size, bench.device
    stage = {"dtype": args.dtype, "device": device, "accel": AccelOptions(channels_last=False), "max_batch_size": batch}
    prior = PriorActor(f"{bench.models}/prior", **stage)
    decoder = DecoderActor({"text2img": f"{bench.models}/decoder"}, **stage)
    calls = max(bench.work.num_rows // batch, 1)

    def prior_call(k: int) -> None:
        prior(bench.work.slice(batch * (k % calls), batch))

    def decoder_call(k: int) -> None:
        decoder(bench.embeds.slice(batch * (k % calls), batch))  # returns once its pixels are on the host

    prior_call(0)
    decoder_call(0)  # warm-ups: cuDNN's algorithm search, the allocator's first blocks
    count = args.colocated_calls
    alone = {"decoder": _rate(decoder_call, count) * batch, "prior": _rate(prior_call, count) * batch}
    result: dict[str, Any] = {
        "batch_size": batch,
        "mps": mps_status() if bench.cuda else "not available",
        "mps_note": MPS_NOTE,
        "decoder_images_per_s_alone": round(alone["decoder"], 4),
        "prior_images_per_s_alone": round(alone["prior"], 4),
        "layout_efficiency_constant": COLOCATION_EFFICIENCY,
    }
    decoder_call_s = batch / alone["decoder"]
    for key, own_streams in (("shared_stream", False), ("separate_streams", True)):
        if not bench.budget.afford(1.5 * count * decoder_call_s, keep=bench.reserve_s):
            result[key] = {"status": "skipped", "reason": "budget"}
            continue
        new_stream = (lambda: torch.cuda.stream(torch.cuda.Stream(device))) if own_streams and bench.cuda else None
        together = _together(decoder_call, prior_call, count=count, stream=new_stream)
        shares = {name: together[name] * batch / alone[name] for name in alone}
        result[key] = {
            "decoder_images_per_s": round(together["decoder"] * batch, 4),
            "prior_images_per_s": round(together["prior"] * batch, 4),
            "decoder_share": round(shares["decoder"], 4),
            "prior_share": round(shares["prior"], 4),
            "efficiency": round(shares["decoder"] + shares["prior"], 4),
        }
    measured = [v["efficiency"] for v in result.values() if isinstance(v, dict) and "efficiency" in v]
    result["efficiency"] = min(measured) if measured else None  # the worse of the two: what a plan may count on
    print(f"co_located: efficiency {result['efficiency']} (cluster/layout.py assumes {COLOCATION_EFFICIENCY})")
    return result


def _rate(call: Any, count: int) -> float:
    """Calls per second over ``count`` calls, one after another (each returns with its results on the host)."""
    started = time.perf_counter()
    for k in range(1, count + 1):
        call(k)
    return count / (time.perf_counter() - started)


def _together(decoder_call: Any, prior_call: Any, *, count: int, stream: Any) -> dict[str, float]:
    """Calls per second of each while the prior calls in a thread for as long as the decoder makes ``count`` calls
    (prior calls that end after the decoder's last do not count). ``stream``: a context manager factory giving each
    thread its own CUDA stream (None: both on the device's current one)."""
    stop, ended, failed = threading.Event(), [], []

    def prior_loop() -> None:
        try:
            with stream() if stream else contextlib.nullcontext():
                k = 1
                while not stop.is_set():
                    prior_call(k)
                    ended.append(time.perf_counter())
                    k += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=prior_loop, name="co-located prior", daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        with stream() if stream else contextlib.nullcontext():
            for k in range(1, count + 1):
                decoder_call(k)
        finished = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]
    seconds = finished - started
    return {"decoder": count / seconds, "prior": sum(t <= finished for t in ended) / seconds}
