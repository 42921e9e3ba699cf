"""Extractor options that keep small detail: overlapping tiles and multi-scale concatenation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY
from fracfeat import ConfigError, DeepFeatures, FeatureStore, extract
from fracfeat._config import ExtractorConfig
from fracfeat._engine import resolve_extractor
from fracfeat._images import load_image, pixels_from_array

KERAS = dict(TINY, runtime="keras", precision="float32")  # one runtime throughout: exact comparisons
DEEP = {k: v for k, v in KERAS.items() if k != "progress"}


@pytest.fixture(scope="module")
def images(real_images):
    return [str(p) for p in real_images["fractured"][:2] + real_images["not_fractured"][:2]]


def test_plain_fingerprint_is_unchanged_by_the_new_options():
    # Stores filled before tiles/scales existed must keep matching: defaults stay out of the fingerprint.
    plain, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras")
    assert "tiles" not in plain.as_dict() and "scales" not in plain.as_dict()
    fields = {k: v for k, v in plain.as_dict().items()}
    assert ExtractorConfig(**fields).fingerprint == plain.fingerprint
    tiled, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", tiles=3)
    tiled2, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", tiles=2)
    multi, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", scales=(32, 64))
    assert len({plain.fingerprint, tiled.fingerprint, tiled2.fingerprint, multi.fingerprint}) == 4
    assert tiled.decode_size == 64 and tiled.n_views == 9 and multi.decode_size == 64 and multi.image_size == 64


@pytest.mark.parametrize("kwargs, match", [
    (dict(tiles=0), "tiles"), (dict(tiles=2.5), "tiles"), (dict(scales=(32,)), "two or more"),
    (dict(scales="32,x"), "scales"), (dict(scales=(32, 16)), "16"), (dict(tiles=2, scales=(32, 64)), "combined"),
])
def test_bad_detail_options_name_the_problem(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", **kwargs)


@pytest.mark.slow
def test_tiles_pool_overlapping_tiles_by_mean_and_max(tmp_path, images):
    fs = extract(images, store=tmp_path / "s", tiles=3, **KERAS)
    assert fs.X.shape == (4, 1024) and fs.provenance["tiles"] == 3 and "scales" not in fs.provenance
    # By hand: decode at 64 px, cut 3 x 3 tiles of 32 px at stride 16, run the plain 32-px extractor on each.
    plain = DeepFeatures(**DEEP).fit()
    for row, path in zip(fs.X, images):
        canvas = load_image(path, 64).pixels
        crops = np.stack([canvas[i:i + 32, j:j + 32] for i in (0, 16, 32) for j in (0, 16, 32)])
        per_tile = plain.transform(crops)
        np.testing.assert_allclose(row, np.concatenate([per_tile.mean(0), per_tile.max(0)]), rtol=1e-5, atol=1e-6)
    # The same code path at prediction time, rebuilt from provenance; and deterministic.
    deep = DeepFeatures.from_provenance(fs.provenance)
    assert deep.fingerprint_ == fs.fingerprint
    np.testing.assert_array_equal(deep.transform(images), fs.X)
    np.testing.assert_array_equal(DeepFeatures(tiles=3, **DEEP).fit().transform(images), fs.X)


@pytest.mark.slow
def test_scales_concatenate_whole_image_features(tmp_path, images):
    fs = extract(images, store=tmp_path / "s", scales=(32, 64), **KERAS)
    assert fs.X.shape == (4, 1024) and fs.provenance["scales"] == [32, 64] and fs.provenance["image_size"] == 64
    big = DeepFeatures(**{**DEEP, "image_size": 64}).fit().transform(images)
    np.testing.assert_array_equal(fs.X[:, 512:], big)
    decoded = [load_image(p, 64).pixels for p in images]
    small = DeepFeatures(**DEEP).fit().transform(np.stack([pixels_from_array(im, 32) for im in decoded]))
    np.testing.assert_allclose(fs.X[:, :512], small, rtol=1e-5, atol=1e-6)
    deep = DeepFeatures.from_provenance(FeatureStore(tmp_path / "s").provenance())
    assert deep.config_.scales == (32, 64)
    np.testing.assert_array_equal(deep.transform(images), fs.X)
    # Other settings, other rows: a second extraction reuses nothing of the plain 64-px rows.
    again = extract(images, store=tmp_path / "s", image_size=64, **{k: v for k, v in KERAS.items() if k != "image_size"})
    assert again.provenance["n_reused"] == 0 and again.fingerprint != fs.fingerprint


@pytest.mark.slow
def test_cli_extract_takes_tiles_and_scales(python, subprocess_env, class_folder, tmp_path):
    import subprocess

    args = [python, "-m", "fracfeat", "extract", str(class_folder), "--weights", "none", "--image-size", "32",
            "--runtime", "keras", "--quiet"]
    r = subprocess.run([*args, "--store", str(tmp_path / "t"), "--tiles", "2"], env=subprocess_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert FeatureStore(tmp_path / "t").open().X.shape == (12, 1024)
    r = subprocess.run([*args, "--store", str(tmp_path / "m"), "--scales", "32,48"], env=subprocess_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert FeatureStore(tmp_path / "m").provenance()["scales"] == [32, 48]
