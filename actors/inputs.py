"""Input images: fetch a URI (any allowed fsspec protocol) or take inline bytes, decode safely, convert.

Conversions (documented in README.md):
- ``image`` / ``prior_image`` / interpolation images: EXIF orientation applied, then RGB (as
  ``diffusers.utils.load_image``); the pipelines resize them themselves.
- ``mask``: single channel ("L"); the inpaint pipeline binarises it at 0.5 (white = repaint).
- ``hint``: RGB (a grayscale depth map is stacked to 3 channels), scaled to [0, 1].
"""

from __future__ import annotations

import collections
import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from actors.retry import StorageUnavailableError, TruncatedReadError, retry
from actors.stage import InputError
from schemas.manifest import DEFAULT_ALLOWED_PROTOCOLS, DEFAULT_MAX_INPUT_PIXELS
from schemas.validation import uri_protocol

_CACHE_ENTRIES = 64


class ImageLoader:
    """Loads `IMAGE_REF` values ({uri, data}) into PIL images, with a small per-actor cache.

    Refuses (with `InputError`): protocols outside ``allowed_protocols``, unreadable URIs, bytes
    that are not an image, and images above ``max_pixels`` (checked from the header, before the
    pixels are decoded, so a decompression bomb costs nothing).
    """

    def __init__(
        self,
        *,
        storage_options: dict[str, Any] | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    ) -> None:
        self.storage_options = storage_options or {}
        self.allowed_protocols = tuple(allowed_protocols)
        self.max_pixels = max_pixels
        self._cache: collections.OrderedDict[str, Image.Image] = collections.OrderedDict()

    def fetch(self, ref: dict, *, column: str) -> bytes:
        """Raw bytes of ``ref``.

        A URI is read whole and its length checked against the object's size, so a connection that
        dropped mid-transfer is retried (`actors.retry`) rather than passed on as a broken image.
        Raises `InputError` for a missing or unreadable object, `StorageUnavailableError` when the
        store keeps failing (the job stops: that is not the row's fault).
        """
        if ref.get("data") is not None:
            return ref["data"]
        uri = ref.get("uri")
        if not uri:
            raise InputError(f"{column}: neither a URI nor bytes")
        protocol = uri_protocol(uri)
        if protocol not in self.allowed_protocols:
            raise InputError(f"{column}: protocol {protocol!r} of {uri!r} is not allowed")
        from fsspec.core import url_to_fs

        try:
            fs, path = url_to_fs(uri, **self.storage_options)
            return retry(lambda: _read_whole(fs, path), what=f"{column}: read {uri}")
        except StorageUnavailableError:
            raise
        except FileNotFoundError as exc:
            raise InputError(f"{column}: {uri!r} does not exist") from exc
        except Exception as exc:
            raise InputError(f"{column}: cannot read {uri!r}: {type(exc).__name__}: {_first_line(exc)}") from exc

    def load(self, ref: dict, *, column: str) -> Image.Image:
        """Decoded image of ``ref`` (EXIF-transposed, original mode); cached by URI or content.

        A remote object that does not decode is fetched once more before it is an input error: a
        transfer can be cut short in a way no size check sees (an object rewritten meanwhile).
        """
        uri = ref.get("uri")
        key = uri or "sha256:" + hashlib.sha256(ref.get("data") or b"").hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        source = uri or "inline bytes"
        try:
            image = self.decode(self.fetch(ref, column=column), column=column, source=source)
        except _Undecodable:
            if ref.get("data") is not None or uri_protocol(uri) in ("file", "local"):
                raise
            image = self.decode(self.fetch(ref, column=column), column=column, source=source)
        self._cache[key] = image
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return image

    def decode(self, data: bytes, *, column: str, source: str) -> Image.Image:
        """Decode ``data`` after checking its header size against ``max_pixels``."""
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > self.max_pixels:
                    raise InputError(
                        f"{column}: {source} is {width}x{height} = {width * height} pixels, "
                        f"above the limit of {self.max_pixels} (--max-input-pixels)"
                    )
                probe.load()
                image = ImageOps.exif_transpose(probe)
                image.load()
        except InputError:
            raise
        except Exception as exc:
            raise _Undecodable(
                f"{column}: {source} is not a decodable image ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        return image

    def rgb(self, ref: dict, *, column: str) -> Image.Image:
        """``ref`` as an RGB image."""
        return self.load(ref, column=column).convert("RGB")

    def mask(self, ref: dict, *, column: str = "mask") -> Image.Image:
        """``ref`` as a single-channel mask."""
        return self.load(ref, column=column).convert("L")


class _Undecodable(InputError):
    """Bytes that are not an image."""


def _read_whole(fs: Any, path: str) -> bytes:
    """The object at ``path``, checked against its size (TruncatedReadError when they differ)."""
    size = fs.size(path)
    data = fs.cat_file(path)
    if size is not None and len(data) != size:
        raise TruncatedReadError(f"{path}: read {len(data)} bytes of {size}")
    return data


def hint_array(image: Image.Image) -> np.ndarray:
    """A depth hint image -> (3, H, W) float32 in [0, 1], as diffusers' ControlNet docs build it."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
