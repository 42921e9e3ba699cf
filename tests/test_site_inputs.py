"""Site-robust pixel settings (crop="content", intensity="percentile"/"clahe") on real FracAtlas and HBFMID
radiographs: what they do to the pixels, their fingerprints, their replay by a saved Pipeline, and that the
defaults are the decoding recipe of before, bit for bit."""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import REPO, SHARED, TINY
from fracfeat import ConfigError, ExtractorSettings
from fracfeat._images import PixelRecipe, content_box, load_image, pixels_from_array, sha256_of_file

HBFMID = SHARED / "data" / "hbfmid"
RANDOM = "random:he-normal:seed=0"
# FracAtlas radiographs whose limb lies in a large dark field (seen on the images).
FIELD_AND_LIMB = ("fractured/IMG0000801.jpg", "fractured/IMG0001572.jpg")


@pytest.fixture(scope="module")
def hbfmid() -> list:
    if not (HBFMID / "manifest.csv").is_file():
        pytest.skip(f"HBFMID radiographs not found at {HBFMID} (set FRACFEAT_SHARED to the shared/ folder)")
    with open(HBFMID / "manifest.csv", newline="") as f:
        return [HBFMID / r["path"] for r in csv.DictReader(f)]


def _rgb(path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.mark.parametrize("name", FIELD_AND_LIMB)
def test_crop_finds_the_content_of_a_fracatlas_radiograph(fracatlas, name):
    img = _rgb(fracatlas / name)
    left, top, right, bottom = content_box(img)
    w, h = img.size
    assert (right - left) * (bottom - top) < 0.5 * w * h  # much smaller than the film
    gray = np.asarray(img.convert("L")).astype(float)
    inside = np.zeros(gray.shape, bool)
    inside[top:bottom, left:right] = True
    bright = gray > np.median(gray) + 50  # the limb, well above the field
    edge = max(w, h) // 50
    bright[:edge], bright[-edge:], bright[:, :edge], bright[:, -edge:] = False, False, False, False  # film edges
    assert bright[inside].sum() >= 0.97 * bright.sum()  # the box holds the limb
    assert gray[inside].mean() > gray[~inside].mean() + 10  # and leaves most of the dark field out


def test_a_tight_hbfmid_crop_is_left_about_as_it_is(hbfmid):
    for path in hbfmid[:6]:  # the first six files of the manifest
        img = _rgb(path)
        left, top, right, bottom = content_box(img)
        assert right - left >= 0.9 * img.width and bottom - top >= 0.9 * img.height, (path.name, (left, top, right, bottom))


def test_crop_of_a_blank_image_keeps_the_whole_image():
    for arr in (np.zeros((40, 50, 3), np.uint8), np.full((40, 50, 3), 200, np.uint8)):
        assert content_box(Image.fromarray(arr)) == (0, 0, 50, 40)
    specks = np.zeros((200, 200, 3), np.uint8)
    specks[100:102, 100:102] = 255  # a foreground of 4 pixels: degenerate, not a 2-pixel crop
    assert content_box(Image.fromarray(specks)) == (0, 0, 200, 200)


@pytest.mark.parametrize("intensity", ["percentile", "clahe"])
def test_intensity_changes_the_pixels_and_keeps_dtype_and_shape(real_images, hbfmid, intensity):
    for path in (real_images["fractured"][0], hbfmid[0]):
        plain = load_image(str(path), 224).pixels
        normalized = load_image(str(path), PixelRecipe(224, intensity=intensity))
        assert normalized.error is None
        px = normalized.pixels
        assert px.dtype == np.uint8 and px.shape == plain.shape == (224, 224, 3)
        assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])
        assert np.abs(px.astype(int) - plain.astype(int)).mean() > 3
        if intensity == "percentile":  # the 1st..99th percentile window becomes 0..255
            assert px.min() <= 5 and px.max() >= 250


def test_every_path_applies_the_recipe_alike(fracatlas, tmp_path):
    """Files, in-memory arrays, views and the tiled canvas all go through the same crop and intensity."""
    from fracfeat._engine import FeatureEngine

    path = str(fracatlas / FIELD_AND_LIMB[0])
    recipe = PixelRecipe(64, crop="content", intensity="clahe")
    from_file = load_image(path, recipe).pixels
    pixels = np.asarray(_rgb(path))
    Image.fromarray(pixels).save(tmp_path / "x.png")  # lossless, and no JPEG draft: the very pixels of the array
    assert np.array_equal(pixels_from_array(pixels, recipe), load_image(str(tmp_path / "x.png"), recipe).pixels)
    flipped = load_image(path, PixelRecipe(64, view="hflip", crop="content", intensity="clahe")).pixels
    assert np.abs(flipped[:, ::-1].astype(int) - from_file.astype(int)).max() <= 1
    config, _ = ExtractorSettings(image_size=32, tiles=3, crop="content", intensity="clahe").resolve(
        None, weights_identity=RANDOM)
    [(_, decoded)] = list(FeatureEngine(config, None).iter_decoded([path]))
    assert np.array_equal(decoded.pixels, load_image(path, PixelRecipe(64, crop="content", intensity="clahe")).pixels)


def _reference_decode(path, size: int) -> np.ndarray:
    """The decoding recipe of fracfeat 0.3 written out with Pillow alone: draft, EXIF, RGB, bilinear squash."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(None, (size, size))
        img.load()
        img = ImageOps.exif_transpose(img).convert("RGB")
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))


def test_default_settings_decode_exactly_as_before(real_images, hbfmid):
    for path in [*real_images["fractured"][1:4], *real_images["not_fractured"][:3], hbfmid[0]]:
        for size in (32, 224):
            assert np.array_equal(load_image(str(path), size).pixels, _reference_decode(path, size)), (path, size)


def _fingerprint(**settings) -> str:
    config, _ = ExtractorSettings(image_size=32, **settings).resolve(None, weights_identity=RANDOM)
    return config.fingerprint


def test_each_setting_changes_the_fingerprint_and_the_defaults_do_not():
    default = _fingerprint()
    assert _fingerprint(crop="none", intensity="none") == default
    others = {_fingerprint(crop="content"), _fingerprint(intensity="percentile"), _fingerprint(intensity="clahe"),
              _fingerprint(crop="content", intensity="clahe")}
    assert len(others) == 4 and default not in others


def test_a_model_saved_by_fracfeat_0_1_keeps_its_fingerprint():
    """Rows stored before the settings existed stay valid: their fingerprint is made again as it was."""
    from fracfeat import load_model

    deep = load_model(REPO / "tests" / "data" / "models" / "fracfeat-0.1.0-svm.joblib")[0]
    assert (deep.crop, deep.intensity) == ("none", "none")
    config, _ = deep.settings().resolve(deep.weights, weights_identity=deep.config_.weights)
    assert config.fingerprint == deep.fingerprint_


@pytest.mark.parametrize("setting,value", [("crop", "square"), ("intensity", "equalize"), ("crop", 3)])
def test_a_bad_value_is_a_one_line_config_error_naming_the_choices(setting, value):
    with pytest.raises(ConfigError) as err:
        ExtractorSettings(**{setting: value}).resolve(None, weights_identity=RANDOM)
    message = str(err.value)
    assert "\n" not in message and f"{setting}=" in message
    assert ("none, content" if setting == "crop" else "none, percentile, clahe") in message


def test_clahe_without_opencv_names_the_install_command(python, subprocess_env):
    code = ("import sys; sys.modules['cv2'] = None\n"  # OpenCV blocked, as if not installed
            "from fracfeat import ExtractorSettings, MissingDependencyError\n"
            "try:\n"
            "    ExtractorSettings(intensity='clahe').resolve(None, weights_identity='random:he-normal:seed=0')\n"
            "except MissingDependencyError as e:\n"
            "    print(e)\n")
    r = subprocess.run([python, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "cv2 is needed for intensity='clahe'" in lines[0]
    assert "pip install 'fracfeat[clahe]'" in lines[0]


FIRST_CLAHE_IN_THREADS = """
import sys
from concurrent.futures import ThreadPoolExecutor
from fracfeat._images import PixelRecipe, decode_bytes
blob = open(sys.argv[1], "rb").read()
with ThreadPoolExecutor(8) as pool:  # OpenCV is first imported by eight decoding threads at once
    print([r.error for r in pool.map(lambda _: decode_bytes(blob, PixelRecipe(32, intensity="clahe")), range(8))])
"""


def test_decoding_threads_that_import_opencv_together_all_get_it(real_images, python, subprocess_env):
    # A fresh process, as a loaded model's first prediction is: no resolve() has imported OpenCV yet.
    r = subprocess.run([python, "-c", FIRST_CLAHE_IN_THREADS, str(real_images["fractured"][0])], env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str([None] * 8), r.stdout + r.stderr


REPLAY = """
import sys, numpy as np
from fracfeat import load_model
model = load_model(sys.argv[1])
paths = sys.argv[3:]
np.save(sys.argv[2], model[0].transform(paths))
"""


def test_a_saved_pipeline_replays_crop_and_clahe_in_a_fresh_process(fracatlas, tmp_path, python, subprocess_env):
    from conftest import manifest_rows
    from fracfeat import extract, fit, save_model

    rows = [r for r in manifest_rows() if r["use"] == "1"]
    picked = [r for r in rows if r["label"] == "fractured"][:6] + [r for r in rows if r["label"] == "not_fractured"][:6]
    paths = [str(fracatlas / r["path"]) for r in picked]
    fs = extract(paths, labels=[r["label"] for r in picked], groups=[r["group"] for r in picked],
                 store=tmp_path / "store", crop="content", intensity="clahe", **TINY)
    assert fs.provenance["crop"] == "content" and fs.provenance["intensity"] == "clahe"
    result = fit(fs, classifier="logreg", n_trials=2, cv=2)
    model = tmp_path / "model.joblib"
    save_model(result.pipeline, model)
    out = tmp_path / "replayed.npy"
    r = subprocess.run([python, "-c", REPLAY, str(model), str(out), *paths], env=subprocess_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row_of = {sha: k for k, sha in enumerate(fs.ids)}
    stored = fs.X[[row_of[sha256_of_file(p)] for p in paths]]  # the store's rows, in the paths' order
    np.testing.assert_array_equal(np.load(out), stored)
