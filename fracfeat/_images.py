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
import math
import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ._views import apply_view, decode_scale

DECODE_RECIPE = "pil-draft-exif-rgb-bilinear-squash-v1"
TRUNCATED_POLICIES = ("read", "reject")



class _SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode; a waiting exclusive holder goes first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive or self._exclusive_waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._exclusive_waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# Pillow reads truncated files only through a module-wide flag (ImageFile.LOAD_TRUNCATED_IMAGES), which
# every thread's decoder consults. Ordinary decodes hold this lock shared (they run in parallel); a
# decode that turns the flag on holds it exclusive, so no other thread decodes with the flag on by
# accident (which would silently accept a truncated file under truncated="reject" and leave it unflagged).
_truncated_flag_lock = _SharedExclusiveLock()


# Every failure reason reads "<kind>: <details and fix>"; the kinds are few and stable, so a summary
# can count failures per kind (FeatureSet.failure_summary) while the details name the exact problem.
def failure(kind: str, details: str) -> str:
    return f"{kind}: {details}"


def failure_kind(reason: str) -> str:
    """The kind of a failure reason (its text before the first colon)."""
    return str(reason).split(":", 1)[0]


@dataclass
class DecodedImage:
    """The outcome of decoding one file: ``pixels`` or ``error`` is set, never both."""

    pixels: np.ndarray | None
    error: str | None = None
    truncated: bool = False


class UnreadableFileError(OSError):
    """A file :func:`sha256_of_file` cannot read; ``reason`` says why, as :func:`read_file` words it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def sha256_of_file(path: str) -> str:
    """sha256 (hex) of the file's bytes, read by :func:`read_file` (a FIFO fails instead of blocking).

    Raises :class:`UnreadableFileError`, an OSError, when the file cannot be read.
    """
    data, error = read_file(path)
    if error is not None:
        raise UnreadableFileError(path, error)
    return hashlib.sha256(data).hexdigest()


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


def _decode(data: bytes, size: int, allow_truncated: bool, view: str = ""):
    from PIL import Image, ImageFile, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        # Pillow itself only warns between 1x and 2x its limit; refuse from 1x, by an explicit check
        # (a warnings filter would be process-wide, not per decoding thread).
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} = {img.width * img.height} pixels, over the limit of {limit}")
        if img.format == "JPEG":
            need = math.ceil(size * decode_scale(view))
            img.draft(None, (need, need))
        if allow_truncated:
            with _truncated_flag_lock.exclusive():
                previous = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = True
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = previous
        else:
            with _truncated_flag_lock.shared():
                img.load()
        img = ImageOps.exif_transpose(img)
        return _rgb_square(img, size, view)


def _rgb_square(img, size: int, view: str = "") -> np.ndarray:
    from PIL import Image

    img = apply_view(_to_rgb(img), view)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def pixels_from_array(image: np.ndarray, size: int, view: str = "") -> np.ndarray:
    """An in-memory uint8 image (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) -> (size, size, 3), as files are.

    ``view``: an augmented view (:mod:`fracfeat._views`) applied before the resize, as for files.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"an image array must be uint8 of shape (h, w), (h, w, 3) or (h, w, 4); "
                         f"got {arr.dtype} {arr.shape}")
    if arr.shape[:2] == (size, size) and arr.ndim == 3 and arr.shape[-1] == 3 and not view:
        return arr
    return _rgb_square(Image.fromarray(arr), size, view)


def _is_truncation(exc: Exception) -> bool:
    text = str(exc).lower()
    return "truncated" in text or "broken data stream" in text or "premature end" in text


def decode_bytes(data: bytes, size: int, truncated: str = "read", view: str = "") -> DecodedImage:
    """Decode image bytes to a (size, size, 3) uint8 array (of the given augmented view), or say why not."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return DecodedImage(None, failure("empty file", "0 bytes"))
    try:
        try:
            return DecodedImage(_decode(data, size, allow_truncated=False, view=view))
        except OSError as e:
            if not _is_truncation(e):
                raise
            if truncated == "reject":
                return DecodedImage(None, failure("truncated image", f"{e}; pass truncated='read' to use what is there"))
            return DecodedImage(_decode(data, size, allow_truncated=True, view=view), truncated=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodedImage(None, failure("too large", f"beyond Pillow's decompression-bomb guard ({e}); "
                                                       f"raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"))
    except UnidentifiedImageError:
        return DecodedImage(None, failure("not an image", "Pillow cannot identify it (unknown or damaged format)"))
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.UnidentifiedImageError) as e:
        return DecodedImage(None, failure("cannot decode", f"{type(e).__name__}: {e}"))


def read_file(path: str) -> tuple[bytes | None, str | None]:
    """The file's bytes, or a reason it cannot be read.

    Only regular files are read: the file is opened non-blocking and checked with ``fstat`` before
    any byte is read, because a FIFO or a device named ``*.jpg`` would otherwise block forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None, failure("file not found", "missing file or broken symlink")
    except PermissionError:
        return None, failure("permission denied", "make the file readable by this user")
    except IsADirectoryError:
        return None, failure("not a regular file", "a directory; point to image files")
    except OSError as e:
        return None, failure("cannot read", str(e))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            return None, failure("not a regular file", f"{what}; point to image files")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(), None
    except OSError as e:
        return None, failure("cannot read", str(e))
    finally:
        os.close(fd)


def load_image(path: str, size: int, truncated: str = "read", expected_sha256: str | None = None,
               view: str = "") -> DecodedImage:
    """Read and decode one file; see the module docstring for the decoding recipe.

    With ``expected_sha256`` (the hash the row will be stored under), bytes that no longer match it
    are refused: the file changed after it was hashed, and its features must not go under the old hash.
    """
    data, error = read_file(path)
    if error is not None:
        return DecodedImage(None, error)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        return DecodedImage(None, failure("changed while extracting",
                                          "the file was rewritten after it was hashed; re-run extract"))
    return decode_bytes(data, size, truncated, view)
