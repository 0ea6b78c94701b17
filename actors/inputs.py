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
import os
import stat
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from actors.retry import StorageUnavailableError, TruncatedReadError, retry
from actors.stage import InputError
from schemas.loggers import logger_for
from schemas.manifest import (
    DEFAULT_ALLOWED_PROTOCOLS,
    DEFAULT_MAX_INPUT_BYTES,
    DEFAULT_MAX_INPUT_PIXELS,
    LOCAL_PROTOCOLS,
    uri_protocol,
)
from schemas.text import first_line, public_uri, quoted, uri_secrets

logger = logger_for(__name__)

_CACHE_ENTRIES = 64
# Pillow's own decompression-bomb guard is a process-wide setting; it is set to our limit while we decode.
_PILLOW_GUARD = threading.Lock()


class ImageLoader:
    """Loads `IMAGE_REF` values ({uri, data}) into PIL images, with a small per-actor cache.

    Refuses (with `InputError`): protocols outside ``allowed_protocols``, unreadable URIs, local
    paths that are not regular files (devices, pipes), inputs above ``max_bytes`` (read no further
    than that), bytes that are not an image, and images above ``max_pixels`` (checked from the
    header, before the pixels are decoded, so a decompression bomb costs nothing).
    """

    def __init__(
        self,
        *,
        storage_options: dict[str, Any] | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
    ) -> None:
        self.storage_options = storage_options or {}
        self.allowed_protocols = tuple(allowed_protocols)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._cache: collections.OrderedDict[str, Image.Image] = collections.OrderedDict()

    def clear(self) -> None:
        """Forget the cached images."""
        self._cache.clear()

    def fetch(self, ref: dict, *, column: str) -> bytes:
        """Raw bytes of ``ref``, at most ``max_bytes`` of them.

        A local file is read as it is (``/proc`` files report a size of 0). An object is read whole
        and its length checked against the size the store reports: a body cut short is retried
        (`actors.retry`), not passed on as a broken image; an object that reads the same twice but
        disagrees with its size (served decompressed, as GCS's decompressive transcoding does) is
        taken as read. Raises `InputError` for a missing, unreadable or too large input,
        `StorageUnavailableError` when the store keeps failing (the job stops: not the row's fault).
        """
        if ref.get("data") is not None:
            self._check_bytes(len(ref["data"]), column=column, source="inline bytes")
            return ref["data"]
        uri = ref.get("uri")
        if not uri:
            raise InputError(f"{column}: neither a URI nor bytes")
        protocol = uri_protocol(uri)
        if protocol not in self.allowed_protocols:
            raise InputError(f"{column}: protocol {quoted(protocol, 40)} of {quoted(public_uri(uri))} is not allowed")
        from actors.storage import open_fs

        try:
            fs, path = open_fs(uri, self.storage_options)
            if protocol in LOCAL_PROTOCOLS:
                return retry(lambda: self._read_local(path, column=column), what=f"{column}: read {uri}")
            return retry(lambda: self._read_object(fs, path, column=column, uri=uri), what=f"{column}: read {uri}")
        except (StorageUnavailableError, InputError):
            raise
        except FileNotFoundError as exc:
            raise InputError(f"{column}: {quoted(public_uri(uri))} does not exist") from exc
        except Exception as exc:
            reason = first_line(exc)
            for secret in uri_secrets(uri):  # a library's message may quote the whole URI
                reason = reason.replace(secret, "<redacted>")
            raise InputError(
                f"{column}: cannot read {quoted(public_uri(uri))}: {type(exc).__name__}: {reason}"
            ) from exc

    def _check_bytes(self, size: int, *, column: str, source: str) -> None:
        if size > self.max_bytes:
            raise InputError(
                f"{column}: {source} is larger than the limit of {self.max_bytes} bytes (--max-input-bytes)"
            )

    def _read_local(self, path: str, *, column: str) -> bytes:
        """A local file's bytes, at most ``max_bytes`` + 1 read: its reported size is not trusted (``/proc``)."""
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a pipe must not block the open
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a folder, a device or a pipe (streams forever, blocks)
            os.close(descriptor)
            raise InputError(f"{column}: {quoted(path)} is not a regular file")
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(self.max_bytes + 1)
        self._check_bytes(len(data), column=column, source=quoted(path))
        return data

    def _read_object(self, fs: Any, path: str, *, column: str, uri: str) -> bytes:
        """An object's bytes, checked against its reported size (see `fetch`); `TruncatedReadError` when two
        reads disagree with the size and with each other (a transfer cut short: retried)."""
        size = fs.size(path)
        if size is not None:
            self._check_bytes(size, column=column, source=quoted(public_uri(uri)))
        data = fs.cat_file(path)
        self._check_bytes(len(data), column=column, source=quoted(public_uri(uri)))
        if size is None or len(data) == size:
            return data
        again = fs.cat_file(path)
        if len(again) == size:
            return again
        if again != data:
            raise TruncatedReadError(f"{path}: read {len(data)} then {len(again)} bytes of {size}")
        logger.warning(
            "%s: %s holds %d bytes, twice, but its store reports %d (served decoded, e.g. Content-Encoding: "
            "gzip): taking the bytes read",
            column,
            uri,
            len(data),
            size,
        )
        return data

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
        source = quoted(public_uri(uri)) if uri else "inline bytes"
        try:
            image = self.decode(self.fetch(ref, column=column), column=column, source=source)
        except _Undecodable:
            if ref.get("data") is not None or uri_protocol(uri) in LOCAL_PROTOCOLS:
                raise
            image = self.decode(self.fetch(ref, column=column), column=column, source=source)
        self._cache[key] = image
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return image

    def decode(self, data: bytes, *, column: str, source: str) -> Image.Image:
        """Decode ``data`` after checking its header size against ``max_pixels``.

        ``max_pixels`` decides alone: Pillow's own bomb guard (a process-wide setting, by default
        about 89 MP to warn and 179 MP to refuse) is set to it while decoding, so a larger limit
        takes effect and an image above it is refused naming the limit, not as undecodable.
        """
        with _PILLOW_GUARD, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check refuses those
            guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, self.max_pixels
            try:
                return self._decode(data, column=column, source=source)
            finally:
                Image.MAX_IMAGE_PIXELS = guard

    def _decode(self, data: bytes, *, column: str, source: str) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > self.max_pixels:
                    raise InputError(self._too_large(column, source, f"{width}x{height} = {width * height} pixels"))
                probe.load()
                image = ImageOps.exif_transpose(probe)
                image.load()
        except InputError:
            raise
        except Image.DecompressionBombError as exc:  # more than twice the limit (in a header, or a frame)
            raise InputError(self._too_large(column, source, f"more than {2 * self.max_pixels} pixels")) from exc
        except Exception as exc:
            raise _Undecodable(
                f"{column}: {source} is not a decodable image ({type(exc).__name__}: {first_line(exc)})"
            ) from exc
        return image

    def _too_large(self, column: str, source: str, size: str) -> str:
        return f"{column}: {source} is {size}, above the limit of {self.max_pixels} (--max-input-pixels)"

    def rgb(self, ref: dict, *, column: str) -> Image.Image:
        """``ref`` as an RGB image."""
        return self.load(ref, column=column).convert("RGB")

    def mask(self, ref: dict, *, column: str = "mask") -> Image.Image:
        """``ref`` as a single-channel mask."""
        return self.load(ref, column=column).convert("L")


class _Undecodable(InputError):
    """Bytes that are not an image."""


def hint_array(image: Image.Image) -> np.ndarray:
    """A depth hint image -> (3, H, W) float32 in [0, 1], as diffusers' ControlNet docs build it."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
