"""One image file -> a (size, size, 3) uint8 array. Failures come back as values, never as crashes.

Decisions kept here, in one place, because every feature depends on them (they are part of the
extractor fingerprint through :data:`DECODE_RECIPE`):

- EXIF orientation is applied (a rotated phone photo of a film becomes upright).
- Grayscale, palette, CMYK and RGBA images become RGB; alpha is dropped.
- More than 8 bits per sample: 16-bit PNG/TIFF radiographs are scaled by the full range of their type
  (65535 -> 255), so an 8-bit image saved as 16-bit gives the same pixels; so is 32-bit integer data
  whose values fit in 0..65535. Other 32-bit integer and float images are scaled by their actual range
  (min..max -> 0..255). A float image holding NaN or infinite pixels is a failure row naming how many
  (fracfeat never guesses pixel values), and so is a constant float or 32-bit image (nothing to scale).
- JPEGs are decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 straight from the DCT as long as
  the result stays at least ``size`` on both sides. Large radiographs decode several times faster.
- The image is resized to ``size`` x ``size`` (aspect ratio not kept, as Keras' ``load_img`` does) with
  Pillow's antialiased bilinear filter.
- Truncated files (a few bytes missing at the end, common in real archives): ``truncated="read"``
  decodes what is there and flags the row; ``truncated="reject"`` reports the file as a failure.
- Any error while decoding one file (a damaged header, a codec error) makes that file a failure row,
  never an exception out of the batch. A damaged EXIF block keeps the image: its orientation is
  applied when it can be read, else the image is decoded as stored and a warning is logged.
- Files over :data:`MAX_FILE_BYTES` are refused before a byte is read, and images over Pillow's
  decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) before they are decoded: failure rows
  ``too large``, with no Pillow warning.

DICOM files (the ``DICM`` preamble, or a ``.dcm`` name) go through their own pixel pipeline first
(:func:`fracfeat._dicom.viewer_pixels`: modality LUT, VOI, MONOCHROME1 inversion, 8-bit grayscale,
as the recipe's ``dicom_*`` settings say), then through :func:`_rgb_square` like every other file.

Two optional settings (:class:`PixelRecipe`; both off by default, which is the recipe above bit for
bit) make sources of other hospitals look alike: ``crop="content"`` (:func:`content_box`) and
``intensity="percentile"`` or ``"clahe"`` (:func:`normalized_intensity`). Every path applies them in
one place, :func:`_rgb_square`: files, images in memory, views, tiles and scales alike.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import stat
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ._deps import require
from ._dicom import DicomFailure, looks_like_dicom, viewer_pixels
from ._errors import MissingDependencyError
from ._views import apply_view, decode_scale

log = logging.getLogger("fracfeat")

DECODE_RECIPE = "pil-draft-exif-rgb-bilinear-squash-v1"
TRUNCATED_POLICIES = ("read", "reject")

# A radiograph file is a few MB at most (the largest of FracAtlas and HBFMID: 0.26 MB); a file over this is a
# mistake (a disk image, a video) and reading it whole could exhaust memory, so it is refused unread.
MAX_FILE_BYTES = 512 * 2**20

CROPS = ("none", "content")
INTENSITIES = ("none", "percentile", "clahe")
CONTENT_PROBE = 128  # side of the grayscale copy the content box is found on
CONTENT_MARGIN = 0.04  # margin around the content box, as a fraction of the image's width / height
CONTENT_MIN_PART = 0.10  # foreground components kept: those of at least this share of the largest's area
CONTENT_ZOOM = 2.0  # with crop="content" JPEGs are decoded twice as large, so a box half as wide keeps detail
PERCENTILES = (1.0, 99.0)  # intensity="percentile": the window, in percentiles of the grayscale
CLAHE_CLIP_LIMIT, CLAHE_TILES = 2.0, 8  # intensity="clahe": OpenCV's clip limit, and an 8 x 8 tile grid



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


@dataclass(frozen=True)
class PixelRecipe:
    """How decoded pixels become the square input of the backbone: the one object the decoder takes.

    Built from a resolved extractor config (:meth:`of`), so a new pixel setting is a field here and
    its code in :func:`_rgb_square`, with no signature to thread it through.

    Parameters
    ----------
    size : int
        Side of the square the image is resized to.
    view : str
        An augmented view (:mod:`fracfeat._views`), "" for none.
    crop : {"none", "content"}
        ``"content"``: crop to :func:`content_box` before the resize.
    intensity : {"none", "percentile", "clahe"}
        Intensity normalisation of the grayscale (:func:`normalized_intensity`), after the crop.
    dicom_window, dicom_invert, dicom_frame : str
        How a DICOM file's pixels are read before the rest of the recipe (:mod:`fracfeat._dicom`).
    """

    size: int
    view: str = ""
    crop: str = "none"
    intensity: str = "none"
    dicom_window: str = "first"
    dicom_invert: str = "monochrome1"
    dicom_frame: str = "first"

    @classmethod
    def of(cls, config) -> "PixelRecipe":
        """The recipe of a resolved :class:`fracfeat.ExtractorConfig` (decode size, view, crop, intensity, DICOM)."""
        return cls(config.decode_size, config.view, config.crop, config.intensity, config.dicom_window,
                   config.dicom_invert, config.dicom_frame)

    @property
    def plain(self) -> bool:
        """Decode and resize only (no view, crop or intensity setting)."""
        return not self.view and self.crop == "none" and self.intensity == "none"

    @property
    def decode_side(self) -> int:
        """The side a JPEG must keep in draft decoding so that the crop or view loses no detail."""
        zoom = CONTENT_ZOOM if self.crop == "content" else 1.0
        return math.ceil(self.size * decode_scale(self.view) * zoom)


def pixel_recipe(recipe, view: str = "") -> PixelRecipe:
    """``recipe`` itself, or for a size (int) the recipe that only resizes (with ``view``)."""
    if isinstance(recipe, PixelRecipe):
        if view:
            raise TypeError("pass the view inside the PixelRecipe, not beside it")
        return recipe
    return PixelRecipe(int(recipe), view)


class _NoPixels(Exception):
    """A file that decodes to no usable pixels; ``reason`` is its failure row's text."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


def sha256_of_file(path: str, max_bytes: float | None = None) -> str:
    """sha256 (hex) of the file's bytes, read by :func:`read_file` (a FIFO fails instead of blocking).

    Raises :class:`UnreadableFileError`, an OSError, when the file cannot be read, or is larger than
    ``max_bytes`` (default :data:`MAX_FILE_BYTES`; ``float("inf")`` for no limit).
    """
    data, error = read_file(path, max_bytes)
    if error is not None:
        raise UnreadableFileError(path, error)
    return hashlib.sha256(data).hexdigest()


def _scaled_to_8_bits(img) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image's values on 0..255 (float), as the module docstring says."""
    arr = np.asarray(img)
    if img.mode == "F":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise _NoPixels(failure("non-finite pixels", f"{bad} of {arr.size} pixels are NaN or infinite; "
                                                         f"fix or re-export the file (fracfeat does not guess them)"))
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            raise _NoPixels(failure("blank image", f"every pixel is {lo:g}: a constant float image has no range "
                                                   f"to scale"))
        return (arr - lo) / (hi - lo) * 255.0
    if img.mode.startswith("I;16") or (arr.min() >= 0 and arr.max() <= 65535):
        # 16-bit data (in a 16- or 32-bit container): the full range of 16 bits, 0..65535 -> 0..255
        return arr.astype(np.float64) / 257.0
    lo, hi = int(arr.min()), int(arr.max())  # 32-bit integers beyond 16 bits: their actual range
    if hi <= lo:
        raise _NoPixels(failure("blank image", f"every pixel is {lo}: a constant image has no range to scale"))
    return (arr.astype(np.float64) - lo) / (hi - lo) * 255.0


def _to_rgb(img):
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = np.clip(np.rint(_scaled_to_8_bits(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "P", "CMYK", "YCbCr", "LAB", "HSV", "1", "L", "RGBX", "RGBa", "La"):
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")
    return img.convert("RGB")


# Pillow warns (DecompressionBombWarning) in Image.open for an image between 1x and 2x its pixel limit;
# fracfeat refuses those itself (a failure row), so the warning is kept from the user. warnings filters
# are process-wide: this lock keeps fracfeat's decoding threads from racing on them.
_open_lock = threading.Lock()


def _open_image(data: bytes):
    from PIL import Image

    with _open_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


_ORIENTATIONS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                 7: "TRANSVERSE", 8: "ROTATE_90"}


def _oriented(img, name: str):
    """``img`` turned as its EXIF orientation says (the pixels of ``ImageOps.exif_transpose``).

    Pillow's own function also rewrites the EXIF block without the orientation, and that rewrite is
    what raises (struct.error, TypeError...) on a damaged block; only the pixels are needed here. A
    block whose orientation cannot be read leaves the image as stored, with a warning.
    """
    from PIL import Image

    try:
        method = _ORIENTATIONS.get(img.getexif().get(0x0112, 1))
    except Exception as e:  # a damaged EXIF block: any error of Pillow's parser
        log.warning("%s: damaged EXIF block (%s: %s); decoded without its orientation", name or "an image",
                    type(e).__name__, e)
        return img
    return img.transpose(getattr(Image.Transpose, method)) if method else img


def _decode(data: bytes, recipe: PixelRecipe, allow_truncated: bool, name: str = ""):
    from PIL import Image, ImageFile

    with _open_image(data) as img:
        # Pillow itself only warns between 1x and 2x its limit; refuse from 1x, by an explicit check
        # (a warnings filter would be process-wide, not per decoding thread).
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(
                f"{img.width}x{img.height} = {img.width * img.height} pixels, over the limit of {limit}")
        if img.format == "JPEG":
            need = recipe.decode_side
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
        return _rgb_square(_oriented(img, name), recipe)


_BINS = 64  # gray levels the threshold is searched on (4 apart): 2,016 pairs of thresholds, not 32,640
_PAIRS = np.triu_indices(_BINS, k=1)


def foreground_threshold(gray: np.ndarray) -> int | None:
    """The level above which a uint8 radiograph is content, not the field around it; None for a constant image.

    The lower threshold of Otsu's method with three classes (field, soft tissue, bone), on 64 gray
    levels: two-class Otsu would split bone from everything else and lose the soft tissue, fingers
    included. An image of two levels only gets two-class Otsu's threshold.
    """
    p = np.bincount(gray.ravel() // (256 // _BINS), minlength=_BINS).astype(np.float64) / gray.size
    cum_p, cum_m = np.cumsum(p), np.cumsum(p * np.arange(_BINS))
    t1, t2 = _PAIRS  # classes [0, t1], (t1, t2], (t2, top]
    w = (cum_p[t1], cum_p[t2] - cum_p[t1], 1.0 - cum_p[t2])
    m = (cum_m[t1], cum_m[t2] - cum_m[t1], cum_m[-1] - cum_m[t2])
    with np.errstate(divide="ignore", invalid="ignore"):
        score = sum(mk * mk / wk for mk, wk in zip(m, w))  # between-class variance, up to a constant
        score[(w[0] <= 1e-12) | (w[1] <= 1e-12) | (w[2] <= 1e-12)] = -np.inf
        if np.isfinite(score).any():
            best = int(t1[np.argmax(score)])
        else:
            two = cum_m[:-1] ** 2 / cum_p[:-1] + (cum_m[-1] - cum_m[:-1]) ** 2 / (1.0 - cum_p[:-1])
            two[(cum_p[:-1] <= 1e-12) | (cum_p[:-1] >= 1 - 1e-12)] = -np.inf
            if not np.isfinite(two).any():
                return None
            best = int(np.argmax(two))
    return (best + 1) * (256 // _BINS) - 1  # the top gray level of the bin


def content_box(img) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a radiograph's content in ``img`` (a PIL image), for ``crop="content"``.

    The rule: on a grayscale copy of at most 128 px a side, :func:`foreground_threshold` (three-class
    Otsu on 64 gray levels) splits the foreground (bone and soft tissue) from the dark field around it; its 8-connected
    components of at least 10% of the largest one's area are kept (so both hands of a two-view film
    stay, and burned-in letters and specks go), and their bounding box, widened by a margin of 4% of
    the image's width and height, is the content. The whole image is returned when there is no clear
    foreground: a constant image, a kept foreground under 1% of the image, or a box under 1/8 of
    either side. A tight crop (another source's framing) gives a box close to the whole image.
    """
    from PIL import Image
    from scipy import ndimage

    w, h = img.size
    whole = (0, 0, w, h)
    small = img.convert("L")
    scale = CONTENT_PROBE / max(w, h)
    if scale < 1:
        small = small.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    gray = np.asarray(small)
    t = foreground_threshold(gray)
    if t is None:
        return whole
    labels, n = ndimage.label(gray > t, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    kept = np.isin(labels, np.flatnonzero(areas >= CONTENT_MIN_PART * areas.max()) + 1)
    if kept.sum() < 0.01 * kept.size:
        return whole
    ys, xs = np.nonzero(kept)
    fx, fy = w / gray.shape[1], h / gray.shape[0]
    mx, my = CONTENT_MARGIN * w, CONTENT_MARGIN * h
    left, right = max(0, math.floor(xs.min() * fx - mx)), min(w, math.ceil((xs.max() + 1) * fx + mx))
    top, bottom = max(0, math.floor(ys.min() * fy - my)), min(h, math.ceil((ys.max() + 1) * fy + my))
    if (right - left) * 8 < w or (bottom - top) * 8 < h:
        return whole
    return left, top, right, bottom


_cv2 = None
_cv2_lock = threading.Lock()


def clahe_library():
    """OpenCV (``cv2``), for intensity="clahe"; :class:`MissingDependencyError` with the install command if absent.

    Imported once, under a lock: decoding threads that meet the first CLAHE image together must not
    see a half-imported module.
    """
    global _cv2
    if _cv2 is None:
        with _cv2_lock:
            if _cv2 is None:
                _cv2 = require("cv2", why="intensity='clahe'")
    return _cv2


def normalized_intensity(img, intensity: str):
    """``img`` (RGB) with its grayscale intensities normalised, as 3 equal channels (a radiograph has no colour).

    - ``"percentile"``: the grayscale's 1st..99th percentile window is stretched to 0..255 (values
      outside it clipped); a flat image (window of width 0) is left as it is.
    - ``"clahe"``: contrast-limited adaptive histogram equalisation of the grayscale with OpenCV
      (``cv2.createCLAHE``, clip limit 2.0, 8 x 8 tiles), so local contrast is alike whatever the
      exposure. OpenCV was measured ~13x faster than scikit-image's ``equalize_adapthist`` on real
      radiographs; install it with ``pip install 'fracfeat[clahe]'``.
    """
    from PIL import Image

    gray = np.asarray(img.convert("L"))
    if intensity == "percentile":
        lo, hi = np.percentile(gray, PERCENTILES)
        if hi > lo:
            gray = np.clip(np.rint((gray - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    elif intensity == "clahe":
        clahe = clahe_library().createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=(CLAHE_TILES, CLAHE_TILES))
        gray = clahe.apply(np.ascontiguousarray(gray))
    else:
        raise ValueError(f"intensity={intensity!r}: choose one of {', '.join(INTENSITIES)}")
    return Image.fromarray(gray, "L").convert("RGB")


def _rgb_square(img, recipe: PixelRecipe) -> np.ndarray:
    """The one place decoded pixels become the backbone's input: RGB, crop, intensity, view, resize."""
    from PIL import Image

    img = _to_rgb(img)
    if recipe.crop == "content":
        img = img.crop(content_box(img))
    if recipe.intensity != "none":
        img = normalized_intensity(img, recipe.intensity)
    img = apply_view(img, recipe.view)
    size = recipe.size
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def pixels_from_array(image: np.ndarray, recipe: PixelRecipe | int, view: str = "") -> np.ndarray:
    """An in-memory uint8 image (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) -> (size, size, 3), as files are.

    ``recipe``: a :class:`PixelRecipe` (its crop, intensity and view applied before the resize, as for
    files), or a size with an optional ``view``.
    """
    from PIL import Image

    recipe = pixel_recipe(recipe, view)
    size = recipe.size
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ValueError(f"an image array must be uint8 of shape (h, w), (h, w, 3) or (h, w, 4); "
                         f"got {arr.dtype} {arr.shape}")
    if arr.shape[:2] == (size, size) and arr.ndim == 3 and arr.shape[-1] == 3 and recipe.plain:
        return arr
    return _rgb_square(Image.fromarray(arr), recipe)


def _decode_dicom(data: bytes, recipe: PixelRecipe) -> DecodedImage:
    """A DICOM file through its own pixel pipeline (:func:`fracfeat._dicom.viewer_pixels`), then ``recipe``.

    Without pydicom the file is a failure row naming the install command (a folder of JPEGs with one
    DICOM file among them still extracts).
    """
    from PIL import Image

    try:
        arr = viewer_pixels(data, recipe.dicom_window, recipe.dicom_invert, recipe.dicom_frame,
                            max_pixels=Image.MAX_IMAGE_PIXELS)
    except DicomFailure as e:
        return DecodedImage(None, failure(e.kind, e.details))
    except MissingDependencyError as e:
        return DecodedImage(None, failure("missing dependency", str(e)))
    return DecodedImage(_rgb_square(Image.fromarray(arr), recipe))


def _is_truncation(exc: Exception) -> bool:
    text = str(exc).lower()
    return "truncated" in text or "broken data stream" in text or "premature end" in text


def decode_bytes(data: bytes, recipe: PixelRecipe | int, truncated: str = "read", view: str = "",
                 name: str = "") -> DecodedImage:
    """Decode image bytes to a (size, size, 3) uint8 array made by ``recipe``, or say why not.

    ``recipe``: a :class:`PixelRecipe`, or a size with an optional augmented ``view``. ``name`` (the
    file's path) names the image in logged warnings. Any error of one file's decoding comes back as
    its failure reason; only a missing optional library (intensity="clahe") raises.
    """
    from PIL import Image, UnidentifiedImageError

    recipe = pixel_recipe(recipe, view)
    if not data:
        return DecodedImage(None, failure("empty file", "0 bytes"))
    if looks_like_dicom(data, name):
        return _decode_dicom(data, recipe)
    try:
        try:
            return DecodedImage(_decode(data, recipe, allow_truncated=False, name=name))
        except OSError as e:
            if not _is_truncation(e):
                raise
            if truncated == "reject":
                return DecodedImage(None, failure("truncated image", f"{e}; pass truncated='read' to use what is there"))
            return DecodedImage(_decode(data, recipe, allow_truncated=True, name=name), truncated=True)
    except _NoPixels as e:
        return DecodedImage(None, e.reason)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodedImage(None, failure("too large", f"beyond Pillow's decompression-bomb guard ({e}); "
                                                       f"raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"))
    except UnidentifiedImageError:
        return DecodedImage(None, failure("not an image", "Pillow cannot identify it (unknown or damaged format)"))
    except MissingDependencyError:
        raise
    except Exception as e:  # any other error of this one file (Pillow raises many kinds) is its failure row
        return DecodedImage(None, failure("cannot decode", f"{type(e).__name__}: {e}"))


def too_large(n_bytes: int, limit: float) -> str:
    """The failure reason of a file of ``n_bytes`` over ``limit`` bytes."""
    return failure("too large", f"file too large ({n_bytes / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB limit); a "
                                f"radiograph needs a few MB: check it is an image, or downscale it (the limit is "
                                f"fracfeat._images.MAX_FILE_BYTES)")


def read_file(path: str, max_bytes: float | None = None) -> tuple[bytes | None, str | None]:
    """The file's bytes, or a reason it cannot be read.

    Only regular files are read: the file is opened non-blocking and checked with ``fstat`` before
    any byte is read, because a FIFO or a device named ``*.jpg`` would otherwise block forever. A file
    over ``max_bytes`` (default :data:`MAX_FILE_BYTES`; ``float("inf")``: no limit) is refused unread.
    """
    limit = MAX_FILE_BYTES if max_bytes is None else max_bytes
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
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            mode = st.st_mode
            what = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            return None, failure("not a regular file", f"{what}; point to image files")
        if st.st_size > limit:
            return None, too_large(st.st_size, limit)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if math.isinf(limit) else f.read(int(limit) + 1)  # +1: a file growing past it
        return (data, None) if len(data) <= limit else (None, too_large(len(data), limit))
    except OSError as e:
        return None, failure("cannot read", str(e))
    finally:
        os.close(fd)


def load_image(path: str, recipe: PixelRecipe | int, truncated: str = "read", expected_sha256: str | None = None,
               view: str = "") -> DecodedImage:
    """Read and decode one file; see the module docstring for the decoding recipe.

    ``recipe``: a :class:`PixelRecipe`, or a size with an optional augmented ``view``.

    With ``expected_sha256`` (the hash the row will be stored under), bytes that no longer match it
    are refused: the file changed after it was hashed, and its features must not go under the old hash.
    """
    data, error = read_file(path)
    if error is not None:
        return DecodedImage(None, error)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        return DecodedImage(None, failure("changed while extracting",
                                          "the file was rewritten after it was hashed; re-run extract"))
    return decode_bytes(data, recipe, truncated, view, name=path)
