"""Test stages: decoders whose loads or restarts take long, as loading gigabytes of weights on a busy node does,
or whose calls a test paces; and `with_decoder`, which puts one of them in the job's chain."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from actors.decoder import DecoderActor


def with_decoder(build_chain: Callable[..., Any], cls: type, **kwargs: Any) -> Callable[..., Any]:
    """``build_chain`` (`jobs.execution.chain.build_chain`) with its decoder stage made by ``cls``, which takes
    ``kwargs`` beside the decoder's own."""

    def build(*args: Any, **options: Any) -> Any:
        stages, sink = build_chain(*args, **options)
        stages = [
            dataclasses.replace(s, cls=cls, kwargs={**s.kwargs, **kwargs}) if s.name == "decoder" else s for s in stages
        ]
        return stages, sink

    return build


class SlowRestartDecoder(DecoderActor):
    """`DecoderActor` that records each start (its pid, one line in ``starts_file``) and, when an earlier
    start is recorded (Ray is restarting it), sleeps ``restart_delay_s`` before loading its models."""

    def __init__(self, *, starts_file: str, restart_delay_s: float, **kwargs: Any) -> None:
        restarting = os.path.exists(starts_file) and os.path.getsize(starts_file) > 0
        with open(starts_file, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        if restarting:
            time.sleep(restart_delay_s)
        super().__init__(**kwargs)


def starts(starts_file: str) -> list[int]:
    """Pids of every start recorded so far."""
    if not os.path.exists(starts_file):
        return []
    with open(starts_file, encoding="utf-8") as handle:
        return [int(line) for line in handle if line.strip()]


class SlowLoadDecoder(DecoderActor):
    """`DecoderActor` whose every start sleeps ``load_delay_s`` first: a model load that takes long."""

    def __init__(self, *, load_delay_s: float, **kwargs: Any) -> None:
        time.sleep(load_delay_s)
        super().__init__(**kwargs)


class GatedDecoder(DecoderActor):
    """`DecoderActor` whose every call first sleeps ``delay_s`` while ``gate_file`` exists: a test paces the
    run (the sleep stands in for GPU time and leaves the CPUs to Ray) and lets the rest run at full speed by
    removing the file."""

    def __init__(self, *, gate_file: str, delay_s: float, **kwargs: Any) -> None:
        self.gate_file, self.delay_s = gate_file, delay_s
        super().__init__(**kwargs)

    def run(self, call: Any, arrays: Any) -> Any:
        if os.path.exists(self.gate_file):
            time.sleep(self.delay_s)
        return super().run(call, arrays)
