"""Image encoding: decoder float output -> uint8 pixels -> PNG bytes, exactly as diffusers makes PIL images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] -> uint8, rounding like diffusers' ``numpy_to_pil``."""
    return (image * 255).round().astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of an (H, W, 3) uint8 array; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
