"""Small input images for tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png(seed: int, side: int = 64) -> bytes:
    """A noise PNG of ``side`` x ``side``: it does not compress, so its size follows its side."""
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
