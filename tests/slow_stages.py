"""Test stages: decoders whose loads or restarts take long, as loading gigabytes of weights on a busy node does."""

from __future__ import annotations

import os
import time
from typing import Any

from actors.decoder import DecoderActor


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
