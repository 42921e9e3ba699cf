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
