"""A user's own Keras model as the backbone: backbone="keras", weights="<file>.keras", its feature layer and
preprocessing declared; identity by sha256, recorded, verified by the saved Pipeline; old fingerprints kept.

The model is a tiny real Keras CNN saved once per module; the images are real radiographs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fracfeat import ConfigError, DeepFeatures, WeightsError, extract, fit, load_model
from fracfeat._config import resolve_extractor
from fracfeat._images import sha256_of_file

REPO = Path(__file__).resolve().parents[1]
SIZE = 48
OWN = dict(backbone="keras", feature_layer="features", preprocessing="scale-0-1", image_size=SIZE, runtime="keras",
           precision="float32")


def _save_model(path: Path, seed: int) -> Path:
    import keras

    def init(i):
        return keras.initializers.HeNormal(seed=seed * 10 + i)

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_initializer=init(0))(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", kernel_initializer=init(1), name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", kernel_initializer=init(2), name="head")(x)
    keras.Model(inputs, outputs, name="hospital_cnn").save(path)
    return path


@pytest.fixture(scope="module")
def own_model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("own-model") / "hospital.keras", seed=1)


@pytest.fixture(scope="module")
def six_images(real_images) -> tuple[list[str], list[str]]:
    paths = real_images["fractured"][:3] + real_images["not_fractured"][:3]
    return [str(p) for p in paths], ["fractured"] * 3 + ["not_fractured"] * 3


@pytest.fixture(scope="module")
def own_features(own_model, six_images, tmp_path_factory):
    paths, labels = six_images
    store = tmp_path_factory.mktemp("own-store") / "store"
    return extract(paths, labels=labels, groups=[f"g{i}" for i in range(6)], store=store, weights=own_model,
                   progress=False, **OWN)


def test_identity_preprocessing_and_layer_are_recorded(own_model, own_features):
    prov = own_features.provenance
    assert prov["weights"] == f"file:sha256:{sha256_of_file(str(own_model), float('inf'))}"
    assert (prov["backbone"], prov["preprocessing"], prov["feature_layer"]) == ("keras", "scale-0-1", "features")
    X = own_features.X
    assert X.shape == (6, 16) and np.isfinite(X).all() and (X >= 0).all()  # the ReLU layer, average-pooled


def test_round_trip_extract_fit_joblib_predict_in_a_fresh_process(own_features, six_images, tmp_path,
                                                                  subprocess_env, python):
    paths, _ = six_images
    result = fit(own_features, classifier="logreg", n_trials=2, cv=2)
    saved = result.save(tmp_path / "own.joblib")
    here = result.pipeline.predict_proba(paths)[:, 1]
    np.testing.assert_allclose(result.pipeline[1:].predict_proba(own_features.X)[:, 1], here, atol=1e-6)
    child = ("import json, sys; from fracfeat import load_model; m = load_model(sys.argv[1]); "
             "print(json.dumps(m.predict_proba(sys.argv[2:])[:, 1].tolist()))")
    out = subprocess.run([python, "-c", child, str(saved), *paths], env=subprocess_env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(json.loads(out.stdout.strip().splitlines()[-1]), here, atol=1e-6)


def test_a_changed_model_file_is_refused_by_the_saved_pipeline(own_features, tmp_path):
    other = _save_model(tmp_path / "other.keras", seed=2)
    deep = DeepFeatures.from_provenance(own_features.provenance, weights=other)
    with pytest.raises(WeightsError, match="are not the weights these features were made with"):
        deep.transform(np.zeros((1, SIZE, SIZE, 3), np.uint8))


def test_a_dense_feature_layer_is_taken_as_is(own_model, real_images):
    deep = DeepFeatures(**{**OWN, "feature_layer": "head"}, weights=own_model).fit()
    X = deep.transform([str(real_images["fractured"][0])])
    assert X.shape == (1, 2) and np.isclose(X.sum(), 1.0, atol=1e-5)  # the softmax, not pooled


@pytest.mark.parametrize("settings, match", [
    (dict(backbone="keras", feature_layer="features"), "needs its input preprocessing declared"),
    (dict(backbone="keras", preprocessing="gamma"), "preprocessing='gamma': choose one of auto, caffe, tf"),
    (dict(backbone="vgg16", feature_layer="block4_pool"), "feature_layer='block4_pool' is for backbone='keras'"),
    (dict(backbone="/data/model.keras"), r"backbone='keras', weights=<the file>"),
])
def test_settings_errors_name_the_fix(settings, match, own_model):
    with pytest.raises(ConfigError, match=match):
        resolve_extractor(weights=own_model, **settings)


def test_model_comes_from_weights(own_model):
    with pytest.raises(ConfigError, match="weights='<file>.keras'"):
        resolve_extractor("keras", None, preprocessing="tf")


def test_an_unknown_feature_layer_names_the_layers(own_model):
    deep = DeepFeatures(**{**OWN, "feature_layer": "fc7"}, weights=own_model).fit()
    with pytest.raises(ConfigError, match=r"'fc7' is not a layer of .*features, global_average_pooling2d\w*, head"):
        deep.transform(np.zeros((1, SIZE, SIZE, 3), np.uint8))


def test_declared_preprocessing_of_a_known_architecture_is_fingerprinted():
    default, _ = resolve_extractor("resnet50", None, 64, "avg", precision="float32", runtime="keras")
    spelled, _ = resolve_extractor("resnet50", None, 64, "avg", precision="float32", runtime="keras",
                                   preprocessing="caffe")
    other, _ = resolve_extractor("resnet50", None, 64, "avg", precision="float32", runtime="keras", preprocessing="tf")
    assert spelled.fingerprint == default.fingerprint != other.fingerprint
    assert other.preprocessing == "tf" and "feature_layer" not in default.as_dict()


def test_earlier_versions_fingerprints_are_unchanged():
    """The fingerprints pickled in the models 0.1-0.3 saved are what these settings resolve to now: their
    stores' rows keep being reused, and the models keep verifying."""
    import joblib

    for saved in sorted((REPO / "tests" / "data" / "models").glob("*.joblib")):
        first = joblib.load(saved)[0]
        steps = [first] if isinstance(first, DeepFeatures) else [s for _, s in first.transformer_list]
        for deep in steps:
            refitted = DeepFeatures(**deep.get_params()).fit()
            assert refitted.fingerprint_ == deep.fingerprint_, saved.name


def test_a_weights_file_for_a_known_architecture_with_declared_preprocessing(vgg16_weights, real_images, tmp_path):
    """RadImageNet's way: a known architecture's weights file, its preprocessing declared, recorded and used."""
    paths = [str(p) for p in real_images["fractured"][:2]]
    common = dict(weights=vgg16_weights, image_size=32, precision="float32", runtime="keras", progress=False)
    caffe = extract(paths, store=tmp_path / "s", backbone="vgg16", **common)
    tf = extract(paths, store=tmp_path / "s", backbone="vgg16", preprocessing="tf", **common)
    assert (caffe.provenance["preprocessing"], tf.provenance["preprocessing"]) == ("caffe", "tf")
    assert tf.fingerprint != caffe.fingerprint and tf.provenance["n_computed"] == 2
    assert not np.allclose(tf.X, caffe.X)
