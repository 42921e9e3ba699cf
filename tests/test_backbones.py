"""Backbone registry: sizes, feature widths per pooling, in-graph preprocessing, weights resolution.

Every model here uses seeded random weights (weights=None) at the backbone's minimum input size, so a
build takes a second or two; models are built once per module and shared between tests.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from fracfeat import ConfigError, WeightsError
from fracfeat._backbones import (
    BACKBONES,
    backbone_spec,
    build_backbone,
    resolve_image_size,
    resolve_pooling,
    resolve_weights,
)
from fracfeat._engine import FeatureEngine
from fracfeat._config import resolve_extractor
from fracfeat._images import load_image

# Final convolution channels of each no-top backbone, and its total stride.
CHANNELS = {"vgg16": 512, "resnet50": 2048, "efficientnetb2": 1408}
# Channels of each tap point (BackboneSpec.tap_layers), shallow to deep.
TAP_CHANNELS = {"vgg16": (64, 128, 256, 512), "resnet50": (256, 512, 1024), "efficientnetb2": (24, 48, 88, 120, 208)}
STRIDE = 32


@functools.lru_cache(maxsize=None)
def engine(backbone: str, pooling: str, size: int) -> FeatureEngine:
    # Keras in float32, forced: these tests look inside the Keras graph and compare it with Keras' own
    # preprocessing (test_engine compares the runtimes and precisions); "auto" would be bfloat16 on a CPU
    # with AVX512-BF16 or AMX.
    config, weights = resolve_extractor(backbone, None, size, pooling, precision="float32", runtime="keras")
    return FeatureEngine(config, weights)


def test_registry_defaults():
    assert {name: spec.default_size for name, spec in BACKBONES.items()} == {
        "vgg16": 224, "resnet50": 224, "efficientnetb2": 260}
    assert {name: spec.preprocessing for name, spec in BACKBONES.items()} == {
        "vgg16": "caffe", "resnet50": "caffe", "efficientnetb2": "raw-0-255"}
    assert backbone_spec("EfficientNet-B2") is BACKBONES["efficientnetb2"]
    assert backbone_spec("ResNet_50") is BACKBONES["resnet50"]


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown backbone 'inception'.*vgg16, resnet50, efficientnetb2"):
        backbone_spec("inception")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_image_size_default_and_minimum(name):
    spec = BACKBONES[name]
    assert resolve_image_size(spec, None) == spec.default_size
    assert resolve_image_size(spec, spec.min_size) == spec.min_size
    with pytest.raises(ConfigError, match=f"minimum of {spec.min_size}"):
        resolve_image_size(spec, spec.min_size - 1)
    with pytest.raises(ConfigError, match="integer"):
        resolve_image_size(spec, "big")


def test_pooling_choices():
    assert [resolve_pooling(p) for p in ("avg", "MAX", "none", None)] == ["avg", "max", "none", "none"]
    with pytest.raises(ConfigError, match="avg, max, none"):
        resolve_pooling("mean")


@pytest.mark.parametrize("pooling", ["avg", "max", "none"])
@pytest.mark.parametrize("backbone", list(CHANNELS))
def test_feature_width_per_pooling(backbone, pooling, real_images):
    # "none" at twice the minimum keeps a 2x2 map, so flattening is told apart from pooling.
    size = BACKBONES[backbone].min_size * (2 if pooling == "none" else 1)
    e = engine(backbone, pooling, size)
    cells = (size // STRIDE) ** 2 if pooling == "none" else 1
    assert e.n_features == CHANNELS[backbone] * cells
    if backbone != "vgg16":
        return  # a forward pass of each pooling is run on VGG16 (the pooling code is shared); saves tracing
    pixels = np.stack([load_image(str(p), size).pixels for p in real_images["fractured"][:2]])
    out = e.forward(pixels)
    assert out.shape == (2, e.n_features) and out.dtype == np.float32
    assert np.isfinite(out).all()
    if pooling == "max":
        assert (out >= engine(backbone, "avg", size).forward(pixels) - 1e-5).all()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(CHANNELS))
def test_every_tap_layer_is_in_the_keras_model(backbone):
    # The names in the registry are Keras' own: a renamed layer would fail here, not in a user's run.
    spec = BACKBONES[backbone]
    assert len(spec.tap_layers) == len(TAP_CHANNELS[backbone])
    config, weights = resolve_extractor(backbone, None, spec.min_size, "avg", runtime="keras", layers="all")
    assert FeatureEngine(config, weights).n_features == sum(TAP_CHANNELS[backbone]) + CHANNELS[backbone]


def _coloured_radiograph(path, size) -> np.ndarray:
    """A real radiograph with distinct channels, so a swapped RGB/BGR order changes the features."""
    gray = load_image(str(path), size).pixels[..., 0].astype(np.int16)
    return np.stack([gray, gray // 2 + 60, 255 - gray], axis=-1).astype(np.uint8)


def _inner_backbone(model):
    import keras

    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(inner) == 1
    return inner[0]


@pytest.mark.parametrize(
    "backbone, keras_module",
    [
        ("vgg16", "vgg16"),
        ("resnet50", "resnet50"),
        ("efficientnetb2", "efficientnet"),
    ],
)
def test_in_graph_preprocessing_equals_keras_preprocess_input(backbone, keras_module, real_images):
    """Features of uint8 pixels == the same backbone on Keras' own preprocess_input of those pixels."""
    import importlib

    size = BACKBONES[backbone].min_size * 2
    e = engine(backbone, "none", size)
    pixels = _coloured_radiograph(real_images["fractured"][0], size)[None]

    ours = e.forward(pixels)

    preprocess_input = importlib.import_module(f"keras.applications.{keras_module}").preprocess_input
    reference_input = preprocess_input(pixels.astype("float32").copy())
    reference = np.asarray(_inner_backbone(e.runner.model)(reference_input, training=False)).reshape(1, -1)
    scale = np.abs(reference).max()
    assert scale > 0
    # Tolerances relative to the features' own scale: random-weight EfficientNetB2 features are about 1e-13,
    # where an element-wise rtol compares rounding noise of two float32 kernels (graph and eager).
    np.testing.assert_allclose(ours / scale, reference / scale, rtol=0, atol=1e-4)
    if backbone != "efficientnetb2":
        # The reference really is BGR: feeding RGB instead gives other features.
        rgb_mean_subtracted = pixels.astype("float32") - np.array([123.68, 116.779, 103.939], "float32")
        wrong = np.asarray(_inner_backbone(e.runner.model)(rgb_mean_subtracted, training=False)).reshape(1, -1)
        assert not np.allclose(ours, wrong, rtol=1e-3, atol=1e-3 * scale)


def test_random_weights_identity():
    r = resolve_weights(BACKBONES["vgg16"], None)
    assert (r.kind, r.path) == ("random", None)
    assert r.identity.startswith("random:")
    assert resolve_weights(BACKBONES["vgg16"], "none") == r


def test_weights_file_identity_is_its_sha256(vgg16_weights):
    r = resolve_weights(BACKBONES["vgg16"], str(vgg16_weights))
    # the sha256 that ../shared/weights/README.md publishes for this file
    assert r.identity == "file:sha256:a2f51117308129c3de9a523c91d35160eb75a6a9e5db1e2afb4f48e48dfb733a"
    assert (r.kind, r.path) == ("file", str(vgg16_weights.resolve()))


def test_missing_weights_file_names_it(tmp_path):
    with pytest.raises(WeightsError, match="nope.weights.h5.*not found"):
        resolve_weights(BACKBONES["vgg16"], tmp_path / "nope.weights.h5")


def test_weights_file_of_another_backbone_is_refused(vgg16_weights):
    spec = BACKBONES["resnet50"]
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always", UserWarning)
        with pytest.raises(WeightsError, match="does not fit resnet50"):
            build_backbone(spec, spec.min_size, resolve_weights(spec, vgg16_weights))
    # Keras' ~100 "Skipping nested container" UserWarnings before it gives up only repeat our one error
    assert [w for w in escaped if issubclass(w.category, UserWarning)] == []


def test_real_vgg16_weights_load_and_differ_from_random(vgg16_weights, real_images):
    config, weights = resolve_extractor("vgg16", vgg16_weights, 64, "avg", runtime="keras")
    pixels = np.stack([load_image(str(p), 64).pixels for p in real_images["fractured"][:2]])
    real = FeatureEngine(config, weights).forward(pixels)
    random = engine("vgg16", "avg", 64).forward(pixels)
    assert np.isfinite(real).all() and (real >= 0).all()  # ReLU features
    assert not np.allclose(real, random)
