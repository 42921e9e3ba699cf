"""A user's own Keras model as the backbone: backbone="keras", weights="<file>.keras", its feature layer and
preprocessing declared; identity by sha256, recorded, verified by the saved Pipeline; old fingerprints kept.

The model is a tiny real Keras CNN saved once per module; the images are real radiographs.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
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


def _make_model(seed: int):
    import keras

    def init(i):
        return keras.initializers.HeNormal(seed=seed * 10 + i)

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_initializer=init(0))(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", kernel_initializer=init(1), name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", kernel_initializer=init(2), name="head")(x)
    return keras.Model(inputs, outputs, name="hospital_cnn")


def _save_model(path: Path, seed: int) -> Path:
    _make_model(seed).save(path)
    return path


@pytest.fixture(scope="module")
def own_model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("own-model") / "hospital.keras", seed=1)


@pytest.fixture(scope="module")
def six_images(real_images) -> tuple[list[str], list[str]]:
    paths = real_images["fractured"][:3] + real_images["not_fractured"][:3]
    return [str(p) for p in paths], ["fractured"] * 3 + ["not_fractured"] * 3


def _extract_six(six_images, store: Path, **settings):
    paths, labels = six_images
    return extract(paths, labels=labels, groups=[f"g{i}" for i in range(6)], store=store, progress=False, **settings)


def _predicted_here_and_in_a_fresh_process(features, paths, tmp_path, env, python) -> tuple[list, list]:
    """fit on ``features``, joblib, and the saved Pipeline's probabilities here and in a new Python process."""
    result = fit(features, classifier="logreg", n_trials=2, cv=2)
    saved = result.save(tmp_path / "model.joblib")
    here = result.pipeline.predict_proba(paths)[:, 1]
    np.testing.assert_allclose(result.pipeline[1:].predict_proba(features.X)[:, 1], here, atol=1e-6)
    child = ("import json, sys; from fracfeat import load_model; m = load_model(sys.argv[1]); "
             "print(json.dumps(m.predict_proba(sys.argv[2:])[:, 1].tolist()))")
    out = subprocess.run([python, "-c", child, str(saved), *paths], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return here, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def own_features(own_model, six_images, tmp_path_factory):
    return _extract_six(six_images, tmp_path_factory.mktemp("own-store") / "store", weights=own_model, **OWN)


def test_identity_preprocessing_and_layer_are_recorded(own_model, own_features):
    prov = own_features.provenance
    assert prov["weights"] == f"file:sha256:{sha256_of_file(str(own_model), float('inf'))}"
    assert (prov["backbone"], prov["preprocessing"], prov["feature_layer"]) == ("keras", "scale-0-1", "features")
    X = own_features.X
    assert X.shape == (6, 16) and np.isfinite(X).all() and (X >= 0).all()  # the ReLU layer, average-pooled


def test_round_trip_extract_fit_joblib_predict_in_a_fresh_process(own_features, six_images, tmp_path,
                                                                  subprocess_env, python):
    here, there = _predicted_here_and_in_a_fresh_process(own_features, six_images[0], tmp_path, subprocess_env, python)
    np.testing.assert_allclose(there, here, atol=1e-6)


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


# -- a Keras model object as backbone= (no .keras file of the user's) ------------------------------------------------
OBJECT = {k: v for k, v in OWN.items() if k != "backbone"}


@pytest.fixture(scope="module")
def kept_models(tmp_path_factory):
    """The cache folder where fracfeat keeps model objects as .keras files, this module's own (children inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("FRACFEAT_CACHE_DIR", str(cache))
        yield cache / "models"


@pytest.fixture(scope="module")
def model_object(kept_models):
    return _make_model(seed=3)


@pytest.fixture(scope="module")
def object_features(model_object, six_images, tmp_path_factory):
    return _extract_six(six_images, tmp_path_factory.mktemp("object-store") / "store", backbone=model_object, **OBJECT)


def test_a_model_object_is_identified_by_its_content_and_kept_once(model_object, object_features, kept_models,
                                                                   six_images, tmp_path):
    import keras

    from fracfeat._backbones import model_identity

    prov = object_features.provenance
    identity = model_identity(model_object)
    assert (prov["backbone"], prov["weights"], prov["weights_kind"]) == ("keras", identity, "model")
    assert prov["weights_path"] == str(kept_models / f"{identity.rsplit(':', 1)[-1]}.keras")
    assert [p.name for p in kept_models.iterdir()] == [Path(prov["weights_path"]).name]  # no temporary file left
    # A .keras file's bytes change with the second it was saved in (the zip holds the date); the content
    # identity of what it holds does not.
    saved = [tmp_path / "a.keras", tmp_path / "b.keras"]
    for path in saved:
        model_object.save(path)
    with zipfile.ZipFile(saved[0]) as z:
        assert "date_saved" in json.loads(z.read("metadata.json"))
    assert model_identity(keras.saving.load_model(saved[1], compile=False)) == identity
    paths, _ = six_images
    from_file = extract(paths, store=tmp_path / "s", backbone="keras", weights=saved[0], progress=False, **OBJECT)
    np.testing.assert_allclose(from_file.X, object_features.X, rtol=0, atol=1e-6)  # the same model, the same rows


def test_the_same_model_object_again_or_loaded_from_a_file_hits_the_feature_cache(model_object, object_features,
                                                                                  six_images, tmp_path):
    import keras

    paths, _ = six_images
    again = extract(paths, store=object_features.store, backbone=model_object, progress=False, **OBJECT)
    model_object.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    reloaded = extract(paths, store=object_features.store, backbone=loaded, progress=False, **OBJECT)
    assert again.provenance["n_computed"] == reloaded.provenance["n_computed"] == 0
    assert again.fingerprint == reloaded.fingerprint == object_features.fingerprint


def test_a_model_object_pipeline_predicts_in_a_fresh_process(object_features, six_images, tmp_path, subprocess_env,
                                                             python, model_object):
    """The saved Pipeline names the kept .keras file, not the object: a new process rebuilds the model from it."""
    paths, _ = six_images
    deep = DeepFeatures(backbone=model_object, **OBJECT).fit()
    np.testing.assert_allclose(deep.transform(paths), object_features.X, rtol=0, atol=1e-6)
    here, there = _predicted_here_and_in_a_fresh_process(object_features, paths, tmp_path, subprocess_env, python)
    np.testing.assert_allclose(there, here, atol=1e-6)


def test_a_changed_or_missing_model_is_refused(model_object, object_features, tmp_path):
    import keras

    other = _save_model(tmp_path / "other.keras", seed=4)
    with pytest.raises(WeightsError, match="holds another model .* than the one these features were made with"):
        DeepFeatures.from_provenance(object_features.provenance, weights=other).transform(
            np.zeros((1, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(WeightsError, match="was kept as .*gone.keras', which is not there: save that model"):
        DeepFeatures.from_provenance(object_features.provenance, weights=tmp_path / "gone.keras").transform(
            np.zeros((1, SIZE, SIZE, 3), np.uint8))
    trained = keras.models.clone_model(model_object)
    trained.set_weights(model_object.get_weights())
    deep = DeepFeatures(backbone=trained, **OBJECT).fit()
    trained.get_layer("features").kernel.assign(trained.get_layer("features").kernel * 2.0)  # trained on since fit
    with pytest.raises(WeightsError, match="are not the weights these features were made with"):
        deep.transform(np.zeros((1, SIZE, SIZE, 3), np.uint8))


@pytest.mark.parametrize("backbone, settings, match", [
    (object(), {}, "backbone= got a builtins.object, which is not a Keras model: pass a keras.Model object"),
    ("model", dict(feature_layer="fc7"), r"'fc7' is not a layer of your model 'hospital_cnn'; .*features, .*head"),
    ("model", dict(weights="vgg16.weights.h5"), "carries its own weights: leave weights= out"),
    ("model", dict(feature_layer=None, preprocessing="auto"), "needs its input preprocessing declared"),
])
def test_model_object_errors_name_the_fix(backbone, settings, match, model_object):
    with pytest.raises(ConfigError, match=match):
        resolve_extractor(model_object if backbone == "model" else backbone, **{**OBJECT, **settings})
