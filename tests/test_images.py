"""Basic decoding: JPEG and PNG, grayscale -> 3 channels, resizing. (Damaged files: test_damaged_images.)"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fracfeat._images import load_image, sha256_of_file


def test_real_grayscale_jpeg_becomes_three_equal_channels(real_images):
    path = real_images["fractured"][0]
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.mode == "L"  # FracAtlas radiographs are 8-bit grayscale JPEGs
    decoded = load_image(str(path), 64)
    assert decoded.error is None and not decoded.truncated
    px = decoded.pixels
    assert px.shape == (64, 64, 3) and px.dtype == np.uint8
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
    assert px.std() > 10  # a real picture, not a blank


def _gradient(h=48, w=40) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 5 + y * 3) % 256).astype(np.uint8)


def test_grayscale_png_equals_its_rgb_png(tmp_path):
    gray = _gradient()
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(tmp_path / "rgb.png")
    a = load_image(str(tmp_path / "gray.png"), 32).pixels
    b = load_image(str(tmp_path / "rgb.png"), 32).pixels
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)


def test_png_at_its_own_size_is_decoded_exactly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "x.png")
    assert np.array_equal(load_image(str(tmp_path / "x.png"), 32).pixels, rgb)


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 17
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    px = load_image(str(tmp_path / "x.png"), 32).pixels
    assert px.shape == (32, 32, 3)
    assert (px[..., 0] == 200).all() and (px[..., 1:] == 0).all()


def test_16bit_png_scales_by_the_full_range(tmp_path):
    gray8 = _gradient(32, 32)
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "x16.png")  # 8-bit values saved as 16-bit
    with Image.open(tmp_path / "x16.png") as img:
        assert img.mode.startswith("I")
    px = load_image(str(tmp_path / "x16.png"), 32).pixels
    assert np.array_equal(px[..., 0], gray8)


def test_rgb_jpeg_keeps_colour_order(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 250  # pure red
    Image.fromarray(rgb, "RGB").save(tmp_path / "red.jpg", quality=95)
    px = load_image(str(tmp_path / "red.jpg"), 32).pixels.astype(int)
    assert px[..., 0].mean() > 230 and px[..., 1].mean() < 20 and px[..., 2].mean() < 20


@pytest.mark.parametrize("size", [32, 224, 260])
def test_resize_gives_the_requested_square(real_images, size):
    px = load_image(str(real_images["not_fractured"][0]), size).pixels
    assert px.shape == (size, size, 3)


def test_decoding_is_deterministic(real_images):
    path = str(real_images["fractured"][1])
    assert np.array_equal(load_image(path, 96).pixels, load_image(path, 96).pixels)


def test_missing_file_is_a_value_not_an_exception(tmp_path):
    decoded = load_image(str(tmp_path / "nope.jpg"), 32)
    assert decoded.pixels is None and "not found" in decoded.error


def test_sha256_of_file_matches_hashlib(real_images):
    import hashlib

    path = real_images["fractured"][0]
    assert sha256_of_file(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()


# -- decoder hardening (issue 19 items 4, 5, 10) ----------------------------------------------------------------

def _real_gray(real_images, side=96) -> np.ndarray:
    """A real radiograph, small and square (so a decode at ``side`` px is not resized)."""
    with Image.open(real_images["fractured"][0]) as img:
        return np.asarray(img.convert("L").resize((side, side), Image.Resampling.BILINEAR))


def _tiff_ifd(*entries) -> bytes:
    """A big-endian TIFF header and one IFD of (tag, type, count, 4-byte value) entries: an EXIF block."""
    import struct

    out = b"MM\x00\x2a" + struct.pack(">IH", 8, len(entries))
    for tag, typ, count, value in entries:
        out += struct.pack(">HHI", tag, typ, count) + value
    return out + struct.pack(">I", 0)


ORIENTATION_6 = (0x0112, 3, 1, b"\x00\x06\x00\x00")  # "rotate 90 degrees clockwise to display"
# Each one is read by Pillow, orientation included, then crashes ImageOps.exif_transpose while it rewrites the
# EXIF block without the orientation: the error each gave with Pillow 13.
MALFORMED_EXIF = {
    "struct.error": _tiff_ifd(ORIENTATION_6, (0xA005, 1, 1, b"\x00\x00\x00\x00")),  # interop IFD pointer as BYTE
    "AttributeError": _tiff_ifd(ORIENTATION_6, (0x010F, 5, 1, b"\x00\x00\x00\x00")),  # Make as RATIONAL
    "TypeError": _tiff_ifd(ORIENTATION_6, (0x011A, 1, 1, b"\x00\x00\x00\x00")),  # XResolution as BYTE
    "ValueError": _tiff_ifd(ORIENTATION_6, (0x8769, 8, 1, b"\xff\xff\xff\xff")),  # EXIF IFD at offset -1
}
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _save_with_exif(path, gray: np.ndarray, fmt: str, blob: bytes) -> None:
    exif = (b"Exif\x00\x00" + blob) if fmt == "JPEG" else blob
    extra = dict(quality=95) if fmt == "JPEG" else dict(lossless=True) if fmt == "WEBP" else {}
    # Stored turned 90 degrees counter-clockwise, so orientation 6 brings it back upright.
    Image.fromarray(np.rot90(gray).copy(), "L").save(path, fmt, exif=exif, **extra)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("defect", MALFORMED_EXIF)
def test_a_malformed_exif_block_keeps_the_image_and_its_orientation(real_images, tmp_path, fmt, defect):
    gray = _real_gray(real_images)
    bad, good = tmp_path / f"bad.{FORMATS[fmt]}", tmp_path / f"good.{FORMATS[fmt]}"
    _save_with_exif(bad, gray, fmt, MALFORMED_EXIF[defect])
    _save_with_exif(good, gray, fmt, _tiff_ifd(ORIENTATION_6))
    decoded = load_image(str(bad), 96)
    assert decoded.error is None, decoded.error
    assert np.array_equal(decoded.pixels, load_image(str(good), 96).pixels)  # same pixels, rotated upright
    if fmt != "JPEG":  # lossless: exactly the upright radiograph
        assert np.array_equal(decoded.pixels[..., 0], gray)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_unreadable_exif_block_decodes_without_orientation_and_says_so(real_images, tmp_path, fmt, caplog):
    gray = _real_gray(real_images)
    path = tmp_path / f"x.{FORMATS[fmt]}"
    _save_with_exif(path, gray, fmt, b"XX\x00\x2a\x00\x00\x00\x08" + bytes(20))  # not a TIFF header: unreadable
    with caplog.at_level("WARNING", logger="fracfeat"):
        decoded = load_image(str(path), 96)
    assert decoded.error is None, decoded.error
    assert np.array_equal(decoded.pixels[..., 0], np.rot90(gray))  # as stored: the orientation is lost
    assert "x." in caplog.text and "EXIF" in caplog.text and "without" in caplog.text


def test_one_malformed_exif_file_does_not_stop_extract(real_images, tmp_path):
    from conftest import TINY
    from fracfeat import extract

    bad = tmp_path / "bad_exif.jpg"
    _save_with_exif(bad, _real_gray(real_images), "JPEG", MALFORMED_EXIF["struct.error"])
    fs = extract([str(bad), str(real_images["fractured"][1])], store=tmp_path / "store", **TINY)
    assert fs.X.shape[0] == 2 and not fs.failures


def test_a_fitted_transformer_reads_a_file_with_a_malformed_exif_block(real_images, tmp_path):
    from fracfeat import DeepFeatures

    gray = _real_gray(real_images)
    bad, good = tmp_path / "bad.jpg", tmp_path / "good.jpg"
    _save_with_exif(bad, gray, "JPEG", MALFORMED_EXIF["TypeError"])
    _save_with_exif(good, gray, "JPEG", _tiff_ifd(ORIENTATION_6))
    deep = DeepFeatures("vgg16", weights=None, image_size=32).fit()
    np.testing.assert_array_equal(deep.transform([str(bad)]), deep.transform([str(good)]))


def _sparse_huge_jpeg(real_images, tmp_path):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.write(real_images["fractured"][0].read_bytes()[:4096])
        f.truncate(12 * 2**30)  # sparse: 12 GiB that cost no disk
    return path


def test_a_huge_file_is_refused_before_it_is_read(real_images, tmp_path):
    from fracfeat._images import MAX_FILE_BYTES, UnreadableFileError

    path = _sparse_huge_jpeg(real_images, tmp_path)
    decoded = load_image(str(path), 32)
    assert decoded.pixels is None and decoded.error.startswith("too large: file too large (12.0 GiB > 0.5 GiB")
    assert MAX_FILE_BYTES == 512 * 2**20
    with pytest.raises(UnreadableFileError, match="too large"):
        sha256_of_file(str(path))


def test_a_huge_file_is_one_failure_row_of_extract(real_images, tmp_path):
    from conftest import TINY
    from fracfeat import extract

    path = _sparse_huge_jpeg(real_images, tmp_path)
    fs = extract([str(path), str(real_images["fractured"][1])], store=tmp_path / "store", **TINY)
    assert fs.X.shape[0] == 1 and fs.failure_summary() == {"too large": 1}


def _header_only_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10000, 20000])  # Pillow warns from 1x its pixel limit, raises from 2x
def test_a_decompression_bomb_is_a_failure_row_and_no_warning(side):
    import warnings

    from fracfeat._images import decode_bytes, failure_kind

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = decode_bytes(_header_only_png(side, side), 32)
    assert decoded.pixels is None and failure_kind(decoded.error) == "too large"
    assert "MAX_IMAGE_PIXELS" in decoded.error
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def _tiff_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    return buf.getvalue()


HIGH_DEPTH = {  # (mode Pillow opens it in, the radiograph's 8-bit gray -> those values)
    "uint16": ("I;16", lambda g: g.astype(np.uint16) * 257),
    "int32": ("I", lambda g: (g.astype(np.int64) * 2**23 - 2**30).astype(np.int32)),  # spans negative to ~1e9
    "float32": ("F", lambda g: (g.astype(np.float32) / 255 * 3.5 - 1.25).astype(np.float32)),
}


@pytest.mark.parametrize("kind", HIGH_DEPTH)
def test_high_bit_depth_tiffs_give_the_radiograph(real_images, kind):
    from fracfeat._images import decode_bytes

    gray = _real_gray(real_images, 128)
    mode, make = HIGH_DEPTH[kind]
    data = _tiff_bytes(make(gray))
    with Image.open(__import__("io").BytesIO(data)) as img:
        assert img.mode == mode
    decoded = decode_bytes(data, 128)
    assert decoded.error is None, decoded.error
    r = np.corrcoef(decoded.pixels[..., 0].ravel().astype(float), gray.ravel().astype(float))[0, 1]
    assert r > 0.99, r
    if kind == "uint16":  # 16-bit: the range of the type, so a 16-bit copy of an 8-bit image is exact
        assert np.array_equal(decoded.pixels[..., 0], gray)
    else:  # 32-bit and float: their actual range becomes 0..255
        assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_a_32bit_tiff_of_16bit_values_decodes_as_the_16bit_file(real_images):
    from fracfeat._images import decode_bytes

    g16 = _real_gray(real_images, 64).astype(np.uint16) * 200
    a = decode_bytes(_tiff_bytes(g16), 64).pixels
    b = decode_bytes(_tiff_bytes(g16.astype(np.int32)), 64).pixels
    assert np.array_equal(a, b)  # 0..65535 in either container: scaled by the 16-bit range, as before


def test_a_float_tiff_with_non_finite_pixels_is_a_failure_row_naming_the_count(real_images):
    from fracfeat._images import decode_bytes, failure_kind

    f = _real_gray(real_images, 64).astype(np.float32)
    f[3, 4], f[10, 11], f[20, 2] = np.inf, -np.inf, np.nan
    decoded = decode_bytes(_tiff_bytes(f), 64)
    assert decoded.pixels is None and failure_kind(decoded.error) == "non-finite pixels"
    assert "3 of 4096 pixels" in decoded.error


@pytest.mark.parametrize("arr", [np.full((16, 16), 7.5, np.float32), np.full((16, 16), -5, np.int32)],
                         ids=["float", "int32"])
def test_a_constant_float_or_32bit_image_is_a_failure_row(arr):
    from fracfeat._images import decode_bytes, failure_kind

    decoded = decode_bytes(_tiff_bytes(arr), 16)
    assert decoded.pixels is None and failure_kind(decoded.error) == "blank image", decoded.error
