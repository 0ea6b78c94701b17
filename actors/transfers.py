"""Host tensors to the device off the critical path: pinned, copied on a stream of their own, waited for on use.

A decoder actor prepares a row's tensors (its noise, its input images) while the other call holds the
GPU (`actors.stage`: loading is outside the device lock); `Uploader.put` starts their copy at once on a
copy stream, and `Uploaded.get`, inside the call, makes the compute stream wait for that copy only.
On the CPU nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class Uploaded:
    """A tensor on its way to the device: ``value`` once ``event`` completed (``host`` kept alive until then)."""

    value: torch.Tensor
    event: Any = None
    host: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        """The device tensor, the current stream made to wait for its copy (no host sync)."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.value.device)
            stream.wait_event(self.event)
            self.value.record_stream(stream)  # its memory is not reused while this stream may still read it
        return self.value


class Uploader:
    """Copies host tensors to ``device`` on a stream of its own (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(self, tensor: torch.Tensor, *, dtype: torch.dtype | None = None) -> Uploaded:
        """Start copying ``tensor`` (cast to ``dtype`` on the host first) to the device."""
        tensor = tensor if dtype is None else tensor.to(dtype)
        if self.stream is None:
            return Uploaded(tensor.to(self.device))
        host = tensor.contiguous().pin_memory()
        with torch.cuda.stream(self.stream):
            value = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Uploaded(value, event, host)
