"""Reading image files as people have them: one function for training and for `predict`.

`open_image` refuses an image larger than a pixel cap before decoding it (a few-KB PNG can
declare 50,000 x 50,000 pixels: a decompression bomb), scales 16-bit images (PNG ``I;16``,
TIFF) to the 8-bit range instead of clipping them at 255, refuses 32-bit float images
(Pillow would clip those too), and converts to "L" or "RGB".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from jaxdl.errors import UserError

# What `data.max_image_pixels` defaults to: Pillow's own default cap.
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)
# Integer modes holding more than 8 bits: 16-bit PNG / TIFF ("I;16*"), 32-bit ints ("I",
# how some readers hand over 16-bit data). Their range is 0..65535.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_cap_lock = threading.Lock()
_cap_users = 0
_saved_cap: int | None = None


@contextlib.contextmanager
def _own_pixel_cap() -> Iterator[None]:
    """Pillow's global bomb check off while jaxdl reads, as `open_image` applies its own cap.

    Pillow's cap is one module global, and a user may raise ours above it. Reader threads
    share the override (counted), and the first value comes back when the last one leaves.
    """
    global _cap_users, _saved_cap
    with _cap_lock:
        if _cap_users == 0:
            _saved_cap, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _cap_users += 1
    try:
        yield
    finally:
        with _cap_lock:
            _cap_users -= 1
            if _cap_users == 0:
                Image.MAX_IMAGE_PIXELS = _saved_cap


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grayscale image -> "L", 65535 -> 255; others unchanged."""
    if img.mode not in _WIDE_MODES:
        return img
    wide = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")


def open_image(
    path: str | Path, mode: str, *, max_pixels: int, field: str, keep_8bit: bool = False
) -> Image.Image:
    """Read `path` into a loaded Pillow image of `mode` ("L" or "RGB"); with `keep_8bit`, an
    image that is already "L" or "RGB" keeps its mode (the caller converts channels).

    Raises UserError naming `field` (the config key or argument that sets the cap) when the
    image has more than `max_pixels` pixels; Pillow's errors (OSError, ValueError,
    SyntaxError) on unreadable files propagate for the caller to word.
    """
    with _own_pixel_cap(), Image.open(path) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise UserError(
                f"{field}: {path} is {width}x{height} = {width * height:,} pixels, more than "
                f"the cap of {max_pixels:,} (a decompression bomb, or a very large image). "
                f"Fix: shrink or remove the file, or raise {field} if the image is genuine."
            )
        img.load()
        if img.mode == "F":  # Pillow would clip its values to 0..255, silently
            raise UserError(
                f"image {path}: 32-bit floating-point pixels, whose range cannot be known. "
                "Fix: save it as an 8- or 16-bit PNG or TIFF."
            )
        img = to_8bit(img)
        return img.copy() if keep_8bit and img.mode in ("L", "RGB") else img.convert(mode)
