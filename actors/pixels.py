"""Decoder images -> uint8 pixels made on the device, one copy into pinned host memory, an Arrow column without copies.

The decoder calls its pipeline with ``output_type="pt"`` and hands the images to `start_copy`, which
does on the device what ``output_type="np"`` followed by `actors.images.to_uint8` does on the host,
bit for bit (tests/test_decoder_pixels.py), and starts one non-blocking copy of the uint8 pixels and
the per-image finite flags into pinned memory. `PixelCopy.wait` (outside the decoder's device lock)
waits for that copy only; `pixels_column` makes the ``pixels`` column point into the copied buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

# Decoder pipelines whose ``output_type="pt"`` images are already in [0, 1]: in diffusers 0.42.1 the
# img2img variants run ``image_processor.postprocess``, which denormalizes and clamps for "pt" as
# well. The others return the raw MoVQ decode and do ``image * 0.5 + 0.5; clamp(0, 1)`` only for "np".
DENORMALIZED_PIPELINES = frozenset({"KandinskyV22Img2ImgPipeline", "KandinskyV22ControlnetImg2ImgPipeline"})
MAX_CHUNK_BYTES = 2**31 - 1  # the int32 offsets of a pa.binary() array address at most this many bytes


@dataclass(frozen=True, kw_only=True)
class Pixels:
    """One image's (height, width, 3) uint8 pixels, row-major: `nbytes` bytes at ``offset`` of ``buffer``.

    ``finite`` is False when the decoder's float image held a NaN (its pixels are then meaningless).
    """

    buffer: pa.Buffer
    offset: int
    height: int
    width: int
    finite: bool

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3

    def array(self) -> np.ndarray:
        """A read-only (height, width, 3) uint8 view of the pixels."""
        values = np.frombuffer(self.buffer, np.uint8, count=self.nbytes, offset=self.offset)
        return values.reshape(self.height, self.width, 3)


class PixelCopy:
    """One call's images on their way to the host; `wait` gives one `Pixels` per image, in order."""

    def __init__(self, host: torch.Tensor, *, event: Any, count: int, height: int, width: int) -> None:
        self._host, self._event = host, event
        self.count, self.height, self.width = count, height, width

    def wait(self) -> list[Pixels]:
        """Wait for the copy (releasing the GIL: another call's thread runs meanwhile); no copy is made here."""
        if self._event is not None:
            self._event.synchronize()
        array = self._host.numpy()
        buffer = pa.py_buffer(array)  # zero-copy: holds the array, and so the pinned tensor, alive
        size = self.height * self.width * 3
        flags = array[self.count * size :]
        return [
            Pixels(buffer=buffer, offset=i * size, height=self.height, width=self.width, finite=bool(flags[i]))
            for i in range(self.count)
        ]


def start_copy(images: torch.Tensor, *, denormalized: bool) -> PixelCopy:
    """Start turning decoder images into host uint8 pixels; returns at once on CUDA.

    ``images``: a decoder pipeline's ``output_type="pt"`` output, (B, 3, H, W) in the model dtype on
    its device; ``denormalized``: the pipeline already mapped it to [0, 1] (`DENORMALIZED_PIPELINES`).
    On the device, exactly what diffusers' "np" path and `actors.images.to_uint8` do on the host:
    ``image * 0.5 + 0.5`` and ``clamp(0, 1)`` in the model dtype (a NaN stays NaN, an inf is clamped),
    then float32, ``(x * 255).round()`` (half to even, like numpy) to uint8, channels last; plus one
    flag per image: all values finite. Pixels and flags share one device buffer, copied once
    (non-blocking, into pinned memory on CUDA; no copy on the CPU). ``images`` is not changed.
    """
    if denormalized:
        values = images.float()
        owned = values is not images  # a float32 pipeline output is not ours to change
    else:
        values = images * 0.5  # the same ops, one at a time, as diffusers; in place: no new 113 MB buffers
        values.add_(0.5).clamp_(0, 1)
        values, owned = values.float(), True
    count, _, height, width = values.shape
    size = height * width * 3
    # A NaN anywhere makes the image's sum NaN; the values lie in [0, 1], so a finite image's sum is
    # finite (one reduction instead of an isfinite pass).
    finite = torch.isfinite(values.sum(dim=(1, 2, 3)))
    scaled = values.mul_(255) if owned else values * 255
    pixels = scaled.round_().to(torch.uint8)
    flat = torch.empty(count * size + count, dtype=torch.uint8, device=pixels.device)
    flat[: count * size].view(count, height, width, 3).copy_(pixels.permute(0, 2, 3, 1))
    flat[count * size :].copy_(finite)
    del values, scaled, pixels
    event = None
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host = flat.cpu()  # the same tensor on the CPU
    return PixelCopy(host, event=event, count=count, height=height, width=width)


def pixels_column(images: list[Pixels | None]) -> pa.ChunkedArray:
    """A ``pa.binary()`` column of ``images`` (None: null) whose values stay in the images' buffers.

    Each chunk is a run of rows whose images lie back to back in one buffer (one call's images in
    row order make one chunk), its data a zero-copy slice of that buffer, at most `MAX_CHUNK_BYTES`.
    """
    chunks: list[pa.Array] = []
    run: list[Pixels | None] = []
    first: Pixels | None = None  # the run's first image
    end = 0  # the offset just past the run's last image
    for image in images:
        if image is not None and first is not None:
            adjacent = image.buffer is first.buffer and image.offset == end
            if not adjacent or end - first.offset + image.nbytes > MAX_CHUNK_BYTES:
                chunks.append(_chunk(run, first))
                run, first = [], None
        if image is not None:
            first = first or image
            end = image.offset + image.nbytes
        run.append(image)
    if run or not chunks:
        chunks.append(_chunk(run, first))
    return pa.chunked_array(chunks, pa.binary())


def _chunk(run: list[Pixels | None], first: Pixels | None) -> pa.Array:
    offsets = np.zeros(len(run) + 1, np.int32)
    np.cumsum([0 if image is None else image.nbytes for image in run], out=offsets[1:])
    valid = np.array([image is not None for image in run], dtype=bool)
    nulls = len(run) - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    data = pa.py_buffer(b"") if first is None else first.buffer.slice(first.offset, int(offsets[-1]))
    return pa.Array.from_buffers(pa.binary(), len(run), [validity, pa.py_buffer(offsets), data], null_count=nulls)
