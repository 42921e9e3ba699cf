"""Extractor options that keep small detail: overlapping tiles, multi-scale and multi-layer concatenation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY
from fracfeat import ConfigError, DeepFeatures, FeatureStore, extract
from fracfeat._config import ExtractorConfig
from fracfeat._config import resolve_extractor
from fracfeat._images import load_image, pixels_from_array

KERAS = dict(TINY, runtime="keras", precision="float32")  # one runtime throughout: exact comparisons
DEEP = {k: v for k, v in KERAS.items() if k != "progress"}


@pytest.fixture(scope="module")
def images(real_images):
    return [str(p) for p in real_images["fractured"][:2] + real_images["not_fractured"][:2]]


def test_plain_fingerprint_is_unchanged_by_the_new_options():
    # Stores filled before tiles/scales/layers existed must keep matching: defaults stay out of the fingerprint.
    plain, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras")
    assert set(plain.as_dict()) == {"backbone", "image_size", "pooling", "preprocessing", "weights", "precision",
                                    "runtime", "decode", "truncated", "feature_code_version"}
    fields = {k: v for k, v in plain.as_dict().items()}
    assert ExtractorConfig(**fields).fingerprint == plain.fingerprint
    tiled, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", tiles=3)
    tiled2, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", tiles=2)
    multi, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", scales=(32, 64))
    assert len({plain.fingerprint, tiled.fingerprint, tiled2.fingerprint, multi.fingerprint}) == 4
    assert tiled.decode_size == 64 and tiled.n_views == 9 and multi.decode_size == 64 and multi.image_size == 64
    deep, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", layers="block3_pool, block4_pool")
    assert deep.layers == ("block3_pool", "block4_pool") and deep.fingerprint != plain.fingerprint
    assert {k: v for k, v in deep.as_dict().items() if k != "layers"} == plain.as_dict()
    every, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", layers="all")
    assert every.layers == ("block1_pool", "block2_pool", "block3_pool", "block4_pool")
    assert resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", layers=[])[0] == plain


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


@pytest.mark.parametrize("backbone, pooling, layers, match", [
    ("vgg16", "avg", ("block9_pool",), r"'block9_pool' is not a tap point of vgg16; choose from block1_pool, "
                                      r"block2_pool, block3_pool, block4_pool"),
    ("resnet50", "avg", "block4_pool", r"not a tap point of resnet50; choose from conv2_block3_out"),
    ("vgg16", "avg", ("block4_pool", "block4_pool"), "each layer once"),
    ("vgg16", "avg", 4, "give layer names"),
    ("vgg16", "none", ("block4_pool",), r"pooling='none'.*pass pooling='avg' or 'max'"),
])
def test_bad_layers_name_the_problem(backbone, pooling, layers, match):
    with pytest.raises(ConfigError, match=match):
        resolve_extractor(backbone, None, 32, pooling, "float32", "keras", layers=layers)
    with pytest.raises(ConfigError, match=match):
        DeepFeatures(**{**DEEP, "backbone": backbone, "pooling": pooling, "layers": layers}).fit()


def _pooled_map(images, layer):
    """Keras' own VGG16 (same seeded weights) cut at ``layer``, averaged over space: the reference."""
    import keras

    from fracfeat._backbones import seeded_random_weights

    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    seeded_random_weights(vgg)
    cut = keras.Model(vgg.input, vgg.get_layer(layer).output)
    pixels = np.stack([load_image(p, 32).pixels for p in images]).astype("float32")
    return np.asarray(cut(keras.applications.vgg16.preprocess_input(pixels))).mean(axis=(1, 2))


@pytest.mark.slow
def test_layers_concatenate_pooled_intermediate_maps(tmp_path, images):
    fs = extract(images, store=tmp_path / "s", layers=("block3_pool", "block4_pool"), **KERAS)
    assert fs.X.shape == (4, 256 + 512 + 512) and fs.provenance["layers"] == ["block3_pool", "block4_pool"]
    np.testing.assert_allclose(fs.X[:, :256], _pooled_map(images, "block3_pool"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.X[:, 256:768], _pooled_map(images, "block4_pool"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.X[:, 768:], DeepFeatures(**DEEP).fit().transform(images), rtol=1e-5, atol=1e-6)
    # Same settings again: every row from the cache, the same version.
    again = extract(images, store=tmp_path / "s", layers=["block3_pool", "block4_pool"], **KERAS)
    assert again.provenance["n_computed"] == 0 and again.version == fs.version
    # The Pipeline's first step, rebuilt from the version's JSON provenance, makes the stored rows.
    deep = DeepFeatures.from_provenance(FeatureStore(tmp_path / "s").provenance())
    assert deep.config_.layers == ("block3_pool", "block4_pool") and deep.fingerprint_ == fs.fingerprint
    np.testing.assert_allclose(deep.transform(images), fs.X, rtol=1e-6, atol=1e-7)
    # Another layer set, another fingerprint: nothing reused.
    other = extract(images, store=tmp_path / "s", layers=("block4_pool",), **KERAS)
    assert other.X.shape == (4, 1024) and other.provenance["n_reused"] == 0
    np.testing.assert_allclose(other.X, fs.X[:, 256:], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("detail, width", [(dict(tiles=2), 2 * 1024), (dict(scales=(32, 48)), 2 * 1024)])
def test_layers_combine_with_tiles_and_scales(images, detail, width):
    # Every tile or scale runs the same multi-layer model: tiles pool its vectors, scales concatenate them.
    deep = DeepFeatures(layers=("block4_pool",), **detail, **DEEP).fit()
    X = deep.transform(images)
    assert X.shape == (4, width) and deep.engine().n_features == width
    plain = DeepFeatures(**detail, **DEEP).fit().transform(images)
    final = [slice(512, 1024), slice(1536, 2048)]  # the final-layer part of each half
    np.testing.assert_allclose(np.concatenate([X[:, s] for s in final], axis=1), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_extract_takes_layers(python, subprocess_env, class_folder, tmp_path):
    import subprocess

    args = [python, "-m", "fracfeat", "extract", str(class_folder), "--store", str(tmp_path / "l"), "--weights", "none",
            "--image-size", "32", "--runtime", "keras", "--quiet", "--layers"]
    r = subprocess.run([*args, "block3_pool,block4_pool"], env=subprocess_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "12 images x 1280 features" in r.stdout
    assert FeatureStore(tmp_path / "l").provenance()["layers"] == ["block3_pool", "block4_pool"]
    r = subprocess.run([*args, "block4_conv3"], env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "'block4_conv3' is not a tap point of vgg16; choose from block1_pool" in r.stderr
