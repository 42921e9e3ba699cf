"""One image file -> a (size, size, 3) uint8 array. Failures come back as values, never as crashes.

Decisions kept here, in one place, because every feature depends on them (they are part of the
extractor fingerprint through :data:`DECODE_RECIPE`):

- EXIF orientation is applied (a rotated phone photo of a film becomes upright).
- Grayscale, palette, CMYK and RGBA images become RGB; alpha is dropped.
- More than 8 bits per sample (16-bit PNG/TIFF radiographs) is scaled by the full range of its type
  (65535 -> 255), so an 8-bit image saved as 16-bit gives the same pixels.
- JPEGs are decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 straight from the DCT as long as
  the result stays at least ``size`` on both sides. Large radiographs decode several times faster.
- The image is resized to ``size`` x ``size`` (aspect ratio not kept, as Keras' ``load_img`` does) with
  Pillow's antialiased bilinear filter.
- Truncated files (a few bytes missing at the end, common in real archives): ``truncated="read"``
  decodes what is there and flags the row; ``truncated="reject"`` reports the file as a failure.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from dataclasses import dataclass

import numpy as np

DECODE_RECIPE = "pil-draft-exif-rgb-bilinear-squash-v1"
TRUNCATED_POLICIES = ("read", "reject")

# Pillow reads truncated files only through a module-wide flag; flip it under a lock.
_truncated_lock = threading.Lock()


@dataclass
class DecodedImage:
    """The outcome of decoding one file: ``pixels`` or ``error`` is set, never both."""

    pixels: np.ndarray | None
    error: str | None = None
    truncated: bool = False


def sha256_of_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _to_rgb(img):
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:
            # 16-bit containers: full range of the type, 0..65535 -> 0..255
            scaled = arr.astype(np.float64) / 257.0
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "P", "CMYK", "YCbCr", "LAB", "HSV", "1", "L", "RGBX", "RGBa", "La"):
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")
    return img.convert("RGB")


def _decode(data: bytes, size: int, allow_truncated: bool):
    from PIL import Image, ImageFile, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft(None, (size, size))
        if allow_truncated:
            with _truncated_lock:
                previous = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = True
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = previous
        else:
            img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _is_truncation(exc: Exception) -> bool:
    text = str(exc).lower()
    return "truncated" in text or "broken data stream" in text or "premature end" in text


def decode_bytes(data: bytes, size: int, truncated: str = "read") -> DecodedImage:
    """Decode image bytes to a (size, size, 3) uint8 array, or say why not."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return DecodedImage(None, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                return DecodedImage(_decode(data, size, allow_truncated=False))
            except OSError as e:
                if not _is_truncation(e):
                    raise
                if truncated == "reject":
                    return DecodedImage(None, f"truncated image file ({e}); pass truncated='read' to use what is there")
                return DecodedImage(_decode(data, size, allow_truncated=True), truncated=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodedImage(None, f"image too large for Pillow's decompression-bomb guard ({e}); "
                                  f"raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted")
    except UnidentifiedImageError:
        return DecodedImage(None, "not an image Pillow can read (unknown or damaged format)")
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as e:
        return DecodedImage(None, f"cannot decode image: {type(e).__name__}: {e}")


def read_file(path: str) -> tuple[bytes | None, str | None]:
    """The file's bytes, or a reason it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, "file not found (missing file or broken symlink)"
    except PermissionError:
        return None, "permission denied: make the file readable"
    except IsADirectoryError:
        return None, "is a directory, not an image file"
    except OSError as e:
        return None, f"cannot read file: {e}"


def load_image(path: str, size: int, truncated: str = "read") -> DecodedImage:
    """Read and decode one file; see the module docstring for the decoding recipe."""
    data, error = read_file(path)
    if error is not None:
        return DecodedImage(None, error)
    return decode_bytes(data, size, truncated)
