"""Backbone registry: sizes, feature widths per pooling, in-graph preprocessing, weights resolution.

Every model here uses seeded random weights (weights=None) at the backbone's minimum input size, so a
build takes a second or two; models are built once per module and shared between tests.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import numpy as np
import pytest

from fracfeat import ConfigError, WeightsError
from fracfeat._backbones import (
    BACKBONES,
    SEPARABLE_MODULES,
    keras_facts,
    backbone_spec,
    build_backbone,
    resolve_image_size,
    resolve_pooling,
    resolve_weights,
    seeded_random_weights,
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
    first = list(BACKBONES)[:3]
    assert {name: BACKBONES[name].default_size for name in first} == {
        "vgg16": 224, "resnet50": 224, "efficientnetb2": 260}
    assert {name: BACKBONES[name].preprocessing for name in first} == {
        "vgg16": "caffe", "resnet50": "caffe", "efficientnetb2": "raw-0-255"}
    assert backbone_spec("DenseNet-121") is BACKBONES["densenet121"]
    assert backbone_spec("EfficientNet-B2") is BACKBONES["efficientnetb2"]
    assert backbone_spec("ResNet_50") is BACKBONES["resnet50"]


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown backbone 'inception'.*vgg16, resnet50, efficientnetb2.*'keras'"):
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


# Keras' MobileNetV3 checks its input size itself (no obtain_input_shape call): 224 px by default, 32 at least.
SIZES_NOT_READ_FROM_KERAS = {"MobileNetV3Small", "MobileNetV3Large"}


def test_registry_is_every_keras_cnn_as_keras_describes_it():
    """Every keras.applications CNN is in the registry, with the sizes and preprocessing Keras gives it."""
    import keras

    constructors = {n for n in dir(keras.applications) if n[0].isupper()}
    assert constructors == {spec.keras_constructor for spec in BACKBONES.values()}
    for spec in BACKBONES.values():
        facts = keras_facts(spec.keras_constructor)
        assert facts["preprocessing"] == spec.preprocessing, spec.name
        assert f"keras.applications.{spec.keras_module}".rsplit(".", 1)[-1] in (facts["keras_module"], "resnet50")
        if spec.keras_constructor in SIZES_NOT_READ_FROM_KERAS:
            assert "default_size" not in facts and (spec.default_size, spec.min_size) == (224, 32)
        else:
            assert (facts["default_size"], facts["min_size"]) == (spec.default_size, spec.min_size), spec.name


def test_in_graph_preprocessing_equals_each_modules_preprocess_input():
    import importlib

    from keras import ops

    from fracfeat._runtimes import preprocess_in_graph

    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype("float32")
    for spec in BACKBONES.values():
        module = importlib.import_module(f"keras.applications.{spec.keras_module}")
        ours = np.asarray(preprocess_in_graph(ops, ops.convert_to_tensor(pixels), spec.preprocessing))
        np.testing.assert_allclose(ours, module.preprocess_input(pixels.copy()), rtol=1e-5, atol=1e-4,
                                   err_msg=spec.name)


# Each child builds its share of the registry in turn (two children: the machine's two cores).
BUILD_CHILD = r"""
import json, sys, time
import numpy as np
import keras
from fracfeat._backbones import BACKBONES
from fracfeat._config import resolve_extractor
from fracfeat._engine import FeatureEngine
from fracfeat._images import load_image
image = sys.argv[1]
for name in sys.argv[2:]:
    spec = BACKBONES[name]
    t = time.perf_counter()
    config, weights = resolve_extractor(name, None, spec.min_size, "avg", precision="float32", runtime="keras")
    pixels = load_image(image, spec.min_size).pixels[None]
    out = np.asarray(FeatureEngine(config, weights).runner.model(pixels, training=False))
    print(json.dumps({"name": name, "shape": list(out.shape), "finite": bool(np.isfinite(out).all()),
                      "seconds": round(time.perf_counter() - t, 2)}), flush=True)
    keras.backend.clear_session()
"""


# Every backbone but the three built above and the eight costliest, one or more of every architecture family. Seconds
# of the costliest (build / fracfeat's seeded weights / one eager forward at the minimum size, one child, load
# average 2-3 here, s27): efficientnetv2l 9.4 / 2.0 / 1.6, convnextxlarge 3.9 / 5.4 / 1.0, nasnetlarge 6.1 / 1.4 / 1.2,
# efficientnetv2m 5.6 / 1.0 / 1.2, efficientnetb7 4.9 / 1.0 / 1.3, convnextlarge 2.3 / 2.7 / 1.0, efficientnetb6
# 3.7 / 1.0 / 0.9, efficientnetb5 3.5 / 0.5 / 1.1 (64 s of the 147 s all 40 took; the build is most of each one's
# cost, not the forward pass). The 29 here took 79 s of CPU in that run (the 11 family members built before: 16 s);
# the eight are built by the opt-in test below.
COSTLIEST = ("efficientnetv2l", "convnextxlarge", "nasnetlarge", "efficientnetv2m", "efficientnetb7", "convnextlarge",
             "efficientnetb6", "efficientnetb5")
IN_THE_SUITE = tuple(name for name in BACKBONES if name not in (*CHANNELS, *COSTLIEST))
EVERY_BACKBONE = "FRACFEAT_TEST_EVERY_BACKBONE"


def _build_in_children(names, image, python, env, cwd) -> dict:
    """Two children (one per core), each building its share of ``names`` in turn: {name: its JSON row}."""
    import subprocess

    children = [subprocess.Popen([python, "-c", BUILD_CHILD, image, *names[i::2]], env=env, cwd=cwd,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    rows = {}
    for child in children:
        out, err = child.communicate(timeout=1200)
        assert child.returncode == 0, err[-3000:]
        rows.update({r["name"]: r for r in map(json.loads, out.strip().splitlines())})
    assert sorted(rows) == sorted(names)
    for name, r in rows.items():
        assert r["shape"] == [1, BACKBONES[name].width] and r["finite"], r
    print("build+extract seconds:", json.dumps({n: rows[n]["seconds"] for n in names}))
    return rows


def test_nearly_every_backbone_builds_and_extracts_at_its_minimum_size(real_images, python, subprocess_env,
                                                                        tmp_path):
    """weights=None (seeded random): the feature model (uint8 in, in-graph preprocessing, backbone, pooling)
    of every backbone but the costliest eight (every architecture family) builds at its minimum size and gives
    one finite row of its width for a real radiograph. Run eagerly (the runner's one-shape graph call is tested
    on the measured three): tracing each graph would cost more than the one call."""
    assert len(IN_THE_SUITE) == len(BACKBONES) - 11
    _build_in_children(list(IN_THE_SUITE), str(real_images["fractured"][0]), python, subprocess_env, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(EVERY_BACKBONE), reason=f"the 8 costliest backbones add 1-2 min on 2 cores: set "
                    f"{EVERY_BACKBONE}=1 to build all 40 (the suite builds 32, every architecture family)")
def test_every_backbone_builds_and_extracts_at_its_minimum_size(real_images, python, subprocess_env, tmp_path):
    """As above, for every registered backbone. Seconds each (build + one eager forward at the minimum
    size, with a second child on the other core, load average 6-7 here): vgg16 2.5, resnet50 7, efficientnetb2
    10, vgg19 2, resnet101 11, resnet152 17, resnet50v2 5, resnet101v2 14, resnet152v2 20, densenet121 14,
    densenet169 19, densenet201 22, efficientnetb0 10, b1 11, b3 9, b4 14, b5 17, b6 29, b7 33, efficientnetv2b0
    13, v2b1 12, v2b2 12, v2b3 17, v2s 13, v2m 23, v2l 41, convnexttiny 9, small 10, base 14, large 15, xlarge
    26, mobilenet 1.4, mobilenetv2 4, mobilenetv3small 5, mobilenetv3large 2, inceptionv3 5, inceptionresnetv2
    15, xception 2.5, nasnetmobile 17, nasnetlarge 25 (325 s in all, the two children side by side; 176 s at load
    average 3.5-6, the costliest then convnextxlarge 32, nasnetlarge 24, convnextlarge 19, nasnetmobile 17,
    inceptionresnetv2 17, efficientnetv2l 15, efficientnetb7 12). The suite's test above took 21-118 s."""
    _build_in_children(list(BACKBONES), str(real_images["fractured"][0]), python, subprocess_env, tmp_path)


def test_the_backbones_command_lists_every_backbone(python, subprocess_env):
    import subprocess

    out = subprocess.run([python, "-m", "fracfeat", "backbones", "--json"], env=subprocess_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == list(BACKBONES)
    dense = next(r for r in rows if r["name"] == "densenet121")
    assert (dense["width"], dense["default_size"], dense["min_size"], dense["preprocessing"]) == (
        1024, 224, 32, "torch")
    text = subprocess.run([python, "-m", "fracfeat", "backbones"], env=subprocess_env, capture_output=True, text=True,
                          timeout=120).stdout
    assert "inceptionv3" in text and "299" in text and "--backbone keras --weights MODEL.keras" in text


def test_backbones_without_known_imagenet_file_or_taps_say_what_to_do():
    with pytest.raises(WeightsError, match=r"DenseNet121\(include_top=False, weights='imagenet'\).save_weights"):
        resolve_weights(BACKBONES["densenet121"], "imagenet")
    with pytest.raises(ConfigError, match="tap points of vgg16, resnet50, efficientnetb2 only, not of densenet121"):
        resolve_extractor("densenet121", None, layers="conv4_block24_concat")
    config, _ = resolve_extractor("densenet121", None)
    assert (config.runtime, config.image_size, config.preprocessing) == ("keras", 224, "torch")


def test_random_weights_are_one_model_whatever_keras_seed():
    """weights=None is one model ("random:he-normal:seed=0"): every randomly initialised variable comes from that
    seed, SeparableConv2D's pointwise kernels (Xception, NASNet) too, not from Keras' own seed state."""
    import importlib
    import inspect

    import keras

    builds = []
    for keras_seed in (1, 2):
        keras.utils.set_random_seed(keras_seed)
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.SeparableConv2D(4, 3), keras.layers.Conv2D(
            4, 3), keras.layers.DepthwiseConv2D(3, padding="same"), keras.layers.Dense(2)])
        seeded_random_weights(model)
        builds.append([np.asarray(v) for v in model.weights])
    assert all(np.array_equal(a, b) for a, b in zip(*builds))
    # The keras.applications modules with separable convolutions are the ones whose rows got another identity.
    separable = {spec.keras_module for spec in BACKBONES.values() if "SeparableConv2D" in inspect.getsource(
        importlib.import_module(getattr(keras.applications, spec.keras_constructor).__module__))}
    assert separable == set(SEPARABLE_MODULES)
    # Rows made before the pointwise kernels were seeded (other numbers in each process) never match these.
    assert resolve_weights(BACKBONES["xception"], None).identity == "random:he-normal:seed=0+pointwise"
    assert resolve_weights(BACKBONES["nasnetlarge"], None).identity == "random:he-normal:seed=0+pointwise"
    assert resolve_weights(BACKBONES["vgg16"], None).identity == "random:he-normal:seed=0"
