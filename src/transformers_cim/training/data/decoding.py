"""Anything image-like (PIL image, ``{"bytes", "path"}`` dict, bytes, path, numpy array) to a fully loaded RGB
``PIL.Image``, or ``None``: :func:`decode_image` never raises on bad data."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

logger = logging.getLogger(__name__)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def decode_image(value: Any, min_size: int = 16) -> PIL.Image.Image | None:
    """Decode ``value`` into a fully loaded RGB image, or ``None`` when it cannot be used. Never raises on bad data.

    ``value`` may be a PIL image, a ``{"bytes": ..., "path": ...}`` dict (``datasets.Image(decode=False)``), raw
    bytes, a local path or URL, or a numpy array (HW or HWC, uint8 / uint16 / float in [0, 1]). EXIF orientation is
    applied (as ``datasets`` does). Transparent images (RGBA, LA, palette with transparency) are composited on
    **white**: the colour under fully transparent pixels is arbitrary and often black, so a plain convert would
    leak it. 16-bit grayscale is scaled to 8 bits (65535 -> 255); float ("F") images in [0, 1] are scaled by 255,
    others clipped to [0, 255]. Images whose shorter side is below ``min_size`` give ``None``, as do truncated,
    empty or unreadable data and unsupported types.
    """
    return decode_image_with_reason(value, min_size)[0]


def decode_image_with_reason(value: Any, min_size: int = 16) -> tuple[PIL.Image.Image | None, str | None]:
    """:func:`decode_image`, and why the value could not be used (None when it could): what the skipped-image log
    says next to the file name or row."""
    try:
        image = _open_image(value)
        if image is None:
            return None, _why_no_image(value)
        if min(image.size) < min_size:
            return None, f"too small ({image.size[0]}x{image.size[1]} px, shorter side under {min_size})"
        image.load()  # truncated or corrupt files fail here, not later in a worker
        image = to_rgb(_exif_transpose(image))
    except Exception as err:  # noqa: BLE001 - bad data of any kind becomes None
        logger.debug("Undecodable image skipped: %s: %s", type(err).__name__, err)
        return None, f"undecodable ({type(err).__name__}: {re.sub(r' <[^>]*>', '', str(err))})"
    if min(image.size) < min_size:
        return None, f"too small ({image.size[0]}x{image.size[1]} px, shorter side under {min_size})"
    return image, None


def _why_no_image(value: Any) -> str:
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return "no image data"
        return "file not found" if value.get("path") else "empty (no bytes, no path)"
    if isinstance(value, (bytes, bytearray, memoryview)) and not len(value):
        return "empty (zero bytes)"
    if isinstance(value, (str, os.PathLike)):
        return "file not found"
    if value is None:
        return "missing (None)"
    return f"not an image ({type(value).__name__})"


def image_name(value: Any) -> str | None:
    """The file name an image value carries (a path, or the ``path`` of a ``{"bytes", "path"}`` dict), or None."""
    if isinstance(value, Mapping):
        path = value.get("path")
        return str(path) if path else None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return None


def _open_image(value: Any) -> PIL.Image.Image | None:
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, Mapping):
        data = value.get("bytes")
        return _open_image(data) if data else _open_image(value.get("path"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return PIL.Image.open(io.BytesIO(bytes(value))) if len(value) else None
    if isinstance(value, (str, os.PathLike)):
        return _open_path(os.fspath(value))
    if isinstance(value, np.ndarray):
        return array_to_image(value)
    return None


def _open_path(path: str) -> PIL.Image.Image | None:
    if os.path.isfile(path):
        return PIL.Image.open(path)
    if "://" in path:  # remote file of a streamed Hub image folder (fsspec URL)
        from datasets.utils.file_utils import xopen

        with xopen(path, "rb") as f:
            return _open_image(f.read())
    return None


def array_to_image(array: np.ndarray) -> PIL.Image.Image | None:
    """HW / HWC / CHW numpy array -> PIL image ("L", "RGB" or "RGBA"), scaled to uint8; None if not image-shaped."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    modes = {2: "L", 3: "RGB", 4: "RGBA"}
    mode = "L" if arr.ndim == 2 else modes.get(arr.shape[2]) if arr.ndim == 3 else None
    if mode is None or arr.size == 0:
        return None
    return PIL.Image.fromarray(_to_uint8(arr), mode=mode)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.round(arr / 257.0).astype(np.uint8)
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = arr.astype(np.float64)
    if is_float and np.nanmax(arr, initial=0.0) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)


def _exif_transpose(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) != 1:
        return PIL.ImageOps.exif_transpose(image)
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any Pillow mode to RGB (see :func:`decode_image` for the transparency and bit-depth rules)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        return _composite_on_white(image)
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    arr = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and arr.max(initial=0) > 255):
        arr = np.round(arr.astype(np.float64) / 257.0)
    elif image.mode == "F" and np.nanmax(arr, initial=0.0) <= 1.0:
        arr = arr.astype(np.float64) * 255.0
    gray = np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(gray, mode="L").convert("RGB")
