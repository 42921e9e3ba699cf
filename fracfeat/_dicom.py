"""DICOM files -> the pixels a radiologist's viewer shows, and the header fields a record keeps.

Read with pydicom (``pip install 'fracfeat[dicom]'``: pydicom, and pylibjpeg with its libjpeg,
openjpeg and RLE plugins for the compressed transfer syntaxes). pydicom is imported only when a DICOM
file is met, so ``import fracfeat`` stays cheap and a machine without it still reads JPEG and PNG.

The pixel pipeline of a grayscale file, in the order of DICOM's display pipeline (PS3.4 N.2):

1. the frame: ``dicom_frame="first"`` (default) or ``"middle"`` of a multi-frame file (one row per
   file: rows are keyed by the file's bytes, so frames cannot be rows of their own);
2. the modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence);
3. the VOI: ``dicom_window="first"`` (default) applies the file's first VOI LUT when it has a VOI LUT
   Sequence, else its first Window Center / Width (VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID);
   ``"widest"`` the window of the largest width; ``"none"`` none. A file without VOI data, or with
   ``"none"``, is scaled by the full range its Bits Stored can hold (through the modality LUT): 12-bit
   data in 16-bit storage by 0..4095, never by the values it happens to hold;
4. MONOCHROME1 (white is zero) inverted, unless ``dicom_invert="never"``;
5. rounded to 8-bit grayscale, then the same :class:`fracfeat._images.PixelRecipe` as every other file
   (crop, intensity, view, resize).

RGB and YBR files (converted to RGB by pydicom) and PALETTE COLOR (its colour LUT applied) skip 2-4 and
are scaled by Bits Stored. Failures are values: :class:`DicomFailure` carries the reason's kind and
details, and :mod:`fracfeat._images` turns it into the file's failure row.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
import threading
from pathlib import Path

import numpy as np

from ._deps import require
from ._errors import ConfigError, SourceError

log = logging.getLogger("fracfeat")

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
DICOM_MAGIC_AT = 128  # a DICOM file: a 128-byte preamble, then b"DICM"
DICOMDIR_NAME = "DICOMDIR"  # a DICOM media directory: an index of files, no pixels of its own

WINDOWS = ("first", "widest", "none")
INVERSIONS = ("monochrome1", "never")
FRAMES = ("first", "middle")

INSTALL = "pip install 'fracfeat[dicom]'"
SALT_ENV = "FRACFEAT_ID_SALT"

# Lossy transfer syntaxes decode to slightly different pixels in each library (pylibjpeg's libjpeg is off
# by one level here and there from libjpeg-turbo), so each has one decoder, whatever else is installed:
# a saved model reads a new file as it read its training files on any machine. JPEG baseline: Pillow, a
# core dependency (the very decoder of fracfeat's .jpg files: identical pixels, 3x faster than pylibjpeg
# on FracAtlas radiographs); the others: pylibjpeg, from the dicom extra. Lossless syntaxes take any
# decoder installed (identical pixels: measured, docs/dicom.md).
PINNED_DECODERS = {
    "1.2.840.10008.1.2.4.50": "pillow",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "pylibjpeg",  # JPEG Extended (Process 2 and 4), 12-bit
    "1.2.840.10008.1.2.4.91": "pylibjpeg",  # JPEG 2000 (lossy allowed)
    "1.2.840.10008.1.2.4.203": "pylibjpeg",  # High-Throughput JPEG 2000 (lossy allowed)
}

# The header fields a record takes (nothing else of the header is read into fracfeat).
HEADER_TAGS = ("PatientID", "StudyInstanceUID", "InstitutionName", "Manufacturer", "BodyPartExamined", "ViewPosition")


class DicomFailure(Exception):
    """A DICOM file that gives no pixels: ``kind`` and ``details`` of its failure row."""

    def __init__(self, kind: str, details: str):
        super().__init__(f"{kind}: {details}")
        self.kind, self.details = kind, details


_pydicom = None
_pydicom_lock = threading.Lock()


def pydicom_library():
    """pydicom, imported once under a lock; :class:`MissingDependencyError` naming the extra if absent."""
    global _pydicom
    if _pydicom is None:
        with _pydicom_lock:
            if _pydicom is None:
                module = require("pydicom", why="DICOM files")
                require("pydicom.pixels", why="DICOM pixels")
                _pydicom = module
    return _pydicom


def has_dicom_magic(head: bytes) -> bool:
    """Whether bytes start like a DICOM file (a 128-byte preamble, then ``DICM``)."""
    return head[DICOM_MAGIC_AT:DICOM_MAGIC_AT + 4] == b"DICM"


def looks_like_dicom(data: bytes, name: str = "") -> bool:
    """Whether a file's bytes (or its ``.dcm`` name) say DICOM."""
    return has_dicom_magic(data) or Path(name).suffix.lower() in DICOM_SUFFIXES


def _dataset(data: bytes, **kwargs):
    pydicom = pydicom_library()
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True, **kwargs)
    except Exception as e:  # pydicom raises many kinds on damaged files
        raise DicomFailure("damaged DICOM", f"pydicom cannot parse it ({type(e).__name__}: {e})") from None


def _decoding_plugin(ds) -> str:
    """The pydicom decoding plugin of this file ("" for any); a failure naming the transfer syntax (and what to
    install) when its pixels cannot be decoded here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ImplicitVRLittleEndian

    if "PixelData" not in ds:
        sop = str(ds.get("SOPClassUID", "") or "")
        what = UID(sop).name if sop else ""
        if not sop or "Image" in what:  # an image without its pixels, or no element read at all
            raise DicomFailure("damaged DICOM", f"{'a ' + what if sop else 'no DICOM element'} could be read but "
                                                f"no pixel data: the file is cut short or damaged; copy it again")
        raise DicomFailure("no pixel data", f"the file holds no image ({what}): a report, a DICOMDIR or a "
                                            f"presentation state; leave it out of the source")
    meta = getattr(ds, "file_meta", None)
    uid = UID(str(meta.get("TransferSyntaxUID", ImplicitVRLittleEndian) if meta is not None else ImplicitVRLittleEndian))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DicomFailure("unsupported transfer syntax", f"{uid.name} ({uid}): no pydicom decoder reads it; "
                                                          f"convert the file, e.g. `gdcmconv --raw in.dcm out.dcm`") from None
    if not decoder.is_available:
        raise DicomFailure("unsupported transfer syntax", f"{uid.name} ({uid}) needs a decoder that is not "
                                                          f"installed: {INSTALL}")
    plugin = PINNED_DECODERS.get(str(uid), "")
    if plugin and plugin not in decoder.available_plugins:
        raise DicomFailure("unsupported transfer syntax", f"{uid.name} ({uid}) is read with {plugin} only (lossy: "
                                                          f"each decoder gives other pixels); {INSTALL}")
    return plugin


def viewer_pixels(data: bytes, window: str = "first", invert: str = "monochrome1", frame: str = "first",
                  max_pixels: int | None = None) -> np.ndarray:
    """A DICOM file's bytes -> uint8 (rows, columns) grayscale or (rows, columns, 3) RGB, as the module says.

    Raises :class:`DicomFailure` (a failure row's kind and details) for a file that gives no pixels, or
    whose frame holds more than ``max_pixels`` pixels (refused before it is decoded).
    """
    pydicom = pydicom_library()
    ds = _dataset(data)
    plugin = _decoding_plugin(ds)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if max_pixels and rows * columns > max_pixels:
        raise DicomFailure("too large", f"{columns}x{rows} = {rows * columns} pixels, over the limit of {max_pixels} "
                                        f"(PIL.Image.MAX_IMAGE_PIXELS; raise it if the file is trusted)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frames // 2 if frame == "middle" else 0
    try:
        arr = pydicom.pixels.pixel_array(ds, index=index if frames > 1 else None, decoding_plugin=plugin)
    except Exception as e:  # a codec error, a short pixel data element...
        raise DicomFailure("cannot decode", f"DICOM pixel data ({type(e).__name__}: {e})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if photometric == "PALETTE COLOR":
        arr, bits = pydicom.pixels.apply_color_lut(arr, ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return np.clip(np.rint(arr[..., :3].astype(np.float64) * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    if arr.ndim != 2:
        raise DicomFailure("cannot decode", f"DICOM pixels of shape {arr.shape}: expected one grayscale frame")
    unit = _displayed(arr, ds, window, bits)
    if photometric == "MONOCHROME1" and invert == "monochrome1":
        unit = 1.0 - unit
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _stored_range(ds, bits: int) -> tuple[int, int]:
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _displayed(arr: np.ndarray, ds, window: str, bits: int) -> np.ndarray:
    """Stored values -> modality LUT -> the chosen VOI, as floats on 0..1 (0: black on MONOCHROME2)."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)
    lut = ds.get("VOILUTSequence")
    centers, widths = _windows(ds)
    if window != "none" and lut and (window == "first" or not widths):
        return _voi_lut(values, lut[0])
    if window != "none" and widths:
        i = 0 if window == "first" else int(np.argmax(widths))
        return _window(values, centers[i], widths[i], str(ds.get("VOILUTFunction", "LINEAR")).upper())
    lo, hi = _stored_range(ds, bits)
    if "ModalityLUTSequence" in ds and bits <= 16:
        ends = apply_modality_lut(np.arange(lo, hi + 1), ds)
    else:
        ends = apply_modality_lut(np.array([lo, hi]), ds)
    lo_v, hi_v = float(np.min(ends)), float(np.max(ends))
    if hi_v <= lo_v:
        raise DicomFailure("blank image", f"Bits Stored {bits} and the modality LUT leave no range to scale")
    return np.clip((values - lo_v) / (hi_v - lo_v), 0.0, 1.0)


def _voi_lut(values: np.ndarray, item) -> np.ndarray:
    """A VOI LUT Sequence item applied (PS3.3 C.11.2.1.1): entries from the first mapped value, clamped at both ends."""
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536  # 0 entries means 2**16
    data = item.LUTData
    table = np.frombuffer(data, np.uint8 if bits <= 8 and len(data) == n else np.uint16) if isinstance(data, bytes) \
        else np.atleast_1d(np.asarray(data))
    index = np.clip(np.rint(values) - first, 0, len(table) - 1).astype(np.int64)
    return np.clip(table[index].astype(np.float64) / (2**bits - 1), 0.0, 1.0)


def _windows(ds) -> tuple[list[float], list[float]]:
    """The file's window centers and widths (the widths > 0), as lists of equal length."""
    def values(name):
        v = ds.get(name)
        return [] if v is None or v == "" else np.atleast_1d(np.asarray(v, dtype=np.float64)).tolist()

    centers, widths = values("WindowCenter"), values("WindowWidth")
    pairs = [(c, w) for c, w in zip(centers, widths) if w > 0]
    return [c for c, _ in pairs], [w for _, w in pairs]


def _window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """DICOM's VOI functions (PS3.3 C.11.2.1.2/3) with an output range of 0..1."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if w < 1:  # LINEAR needs a width of at least 1
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


# -- the header fields of a record --------------------------------------------------------------------

_salt_lock = threading.Lock()
_salt_cache: dict[str, bytes] = {}


def salt_file() -> Path:
    """Where the default salt is kept: ``$XDG_CONFIG_HOME/fracfeat/id_salt`` (``~/.config/...``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fracfeat" / "id_salt"


def id_salt() -> bytes:
    """The secret patient identifiers are hashed with: ``$FRACFEAT_ID_SALT``, else this user's salt file.

    The salt file is made at first use (64 random hex digits, readable by this user only), so every
    store this user makes groups one patient alike; set ``FRACFEAT_ID_SALT`` to the same secret on
    every machine whose stores are to be combined.
    """
    given = os.environ.get(SALT_ENV)
    if given:
        return given.encode()
    path = salt_file()
    with _salt_lock:
        key = str(path)
        if key not in _salt_cache:
            _salt_cache[key] = _read_or_make_salt(path)
        return _salt_cache[key]


def _read_or_make_salt(path: Path) -> bytes:
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".id_salt.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # never replaces a salt another process made meanwhile
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            log.info("made the salt patient identifiers are hashed with: %s (keep it; or set %s)", path, SALT_ENV)
        salt = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read or make the patient-ID salt file {path} ({e.strerror}): set the "
                          f"environment variable {SALT_ENV} to a secret of your own") from None
    if not salt:
        raise ConfigError(f"the patient-ID salt file {path} is empty: delete it (a new one is made) or set {SALT_ENV}")
    return salt.encode()


def patient_group(patient_id: str, study_uid: str = "") -> str:
    """The group of a DICOM file: a salted hash of its PatientID (else of its StudyInstanceUID), or ""."""
    if patient_id:
        kind, value = "pt", patient_id
    elif study_uid:
        kind, value = "st", study_uid
    else:
        return ""
    digest = hmac.new(id_salt(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:20]}"


def header_fields(path: str) -> dict:
    """``group``, ``source``, ``region`` and ``projection`` a DICOM file's header gives ({} when it cannot be read).

    ``group``: :func:`patient_group` of PatientID (else StudyInstanceUID); ``source``: InstitutionName,
    else Manufacturer; ``region``: BodyPartExamined, lower case; ``projection``: ViewPosition (AP, PA, LL...),
    upper case as DICOM writes it. Only the header's first elements are read (up to the pixels). A damaged
    file gives {}: decoding it makes its failure row.
    """
    pydicom = pydicom_library()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(HEADER_TAGS))
    except Exception as e:  # any parse error: the pixels' decoding reports it as the file's failure
        log.debug("%s: DICOM header unreadable (%s: %s)", path, type(e).__name__, e)
        return {}

    def text(name: str) -> str:
        try:
            return str(ds.get(name, "") or "").strip()
        except Exception:  # a value pydicom cannot convert: treated as absent
            return ""

    return {"group": patient_group(text("PatientID"), text("StudyInstanceUID")),
            "source": text("InstitutionName") or text("Manufacturer"),
            "region": text("BodyPartExamined").lower(), "projection": text("ViewPosition").upper()}


def dicomdir_paths(path: Path) -> list[Path]:
    """The image files a DICOMDIR lists (those that exist), in its order."""
    pydicom_library()
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(str(path))
    except Exception as e:  # a damaged or foreign DICOMDIR
        raise SourceError(f"{path}: not a readable DICOMDIR ({type(e).__name__}: {e}); point to its folder instead") from None
    return [Path(instance.path) for instance in fs if Path(instance.path).is_file()]
