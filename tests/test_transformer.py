"""DeepFeatures: the same features as the store, sklearn conventions, small pickles, verified weights."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from conftest import TINY
from fracfeat import DeepFeatures, WeightsError, extract, fit
from fracfeat._images import load_image

TINY_PARAMS = dict(backbone="vgg16", weights=None, image_size=32)


def test_transform_of_paths_equals_the_store_rows(tiny_features):
    deep = DeepFeatures.from_provenance(tiny_features.provenance)
    assert deep.fingerprint_ == tiny_features.fingerprint
    np.testing.assert_array_equal(deep.transform(list(tiny_features.paths)), tiny_features.X)
    # Same through a freshly configured transformer with the store's settings (precision resolved).
    again = DeepFeatures(**TINY_PARAMS, precision=deep.precision, runtime=deep.runtime).fit()
    assert again.fingerprint_ == tiny_features.fingerprint


def test_transform_of_uint8_arrays_matches_files(tiny_features):
    deep = DeepFeatures.from_provenance(tiny_features.provenance)
    paths = list(tiny_features.paths[:3])
    decoded = np.stack([load_image(p, 32).pixels for p in paths])
    np.testing.assert_array_equal(deep.transform(decoded), tiny_features.X[:3])
    # Other sizes and grayscale go through the same RGB conversion and resize as files.
    gray = np.full((3, 50, 40), 128, dtype=np.uint8)
    assert deep.transform(gray).shape == (3, tiny_features.n_features)
    assert deep.transform([np.full((20, 30, 3), 7, np.uint8)]).shape == (1, tiny_features.n_features)


@pytest.mark.parametrize("bad, message", [
    ("one.jpg", "wrap it in a list"),
    (np.zeros((2, 512), np.float32), "call pipeline\\[1:\\]"),
    ([], "no images"),
    ([1, 2], "list of image paths"),
])
def test_wrong_input_says_what_to_pass(tiny_features, bad, message):
    deep = DeepFeatures.from_provenance(tiny_features.provenance)
    with pytest.raises(ValueError, match=message):
        deep.transform(bad)


def test_an_unreadable_image_raises_naming_the_file(tiny_features, tmp_path):
    from fracfeat import ImageError

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    deep = DeepFeatures.from_provenance(tiny_features.provenance)
    with pytest.raises(ImageError, match="broken.jpg"):
        deep.transform([tiny_features.paths[0], broken])


def test_sklearn_conventions():
    deep = DeepFeatures(weights="/nowhere/weights.h5", image_size=64)  # __init__ does no work: no error yet
    assert deep.get_params()["image_size"] == 64 and not [k for k in vars(deep) if k.endswith("_")]
    deep.set_params(image_size=48, weights=None)
    cloned = clone(deep)
    assert cloned.get_params() == deep.get_params() and cloned is not deep
    fitted = deep.fit()
    assert fitted is deep and {"config_", "fingerprint_"} <= set(vars(deep))
    assert not hasattr(clone(deep), "config_")


class _TabularTagged(DeepFeatures):
    """DeepFeatures declares image input (paths, uint8 stacks); sklearn then skips every data check.

    Declaring 2-D input here lets sklearn run its API checks; the ones that feed numeric tables to
    ``transform`` (or expect tabular validation messages from ``fit``) are listed below with why.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        return tags


_TABLES = "feeds a numeric table to transform; DeepFeatures takes image paths or uint8 images"
_NO_VALIDATION_IN_FIT = "expects fit to validate a numeric X; DeepFeatures.fit learns nothing and reads no data"
SKIPPED_CHECKS = {
    "check_fit_score_takes_y": _TABLES,
    "check_estimators_dtypes": _TABLES,
    "check_dtype_object": _TABLES,
    "check_pipeline_consistency": _TABLES,
    "check_estimators_pickle": _TABLES,
    "check_f_contiguous_array_estimator": _TABLES,
    "check_transformer_data_not_an_array": _TABLES,
    "check_transformer_general": _TABLES,
    "check_methods_sample_order_invariance": _TABLES,
    "check_methods_subset_invariance": _TABLES,
    "check_dict_unchanged": _TABLES,
    "check_fit_idempotent": _TABLES,
    "check_fit2d_predict1d": _TABLES,
    "check_complex_data": _NO_VALIDATION_IN_FIT,
    "check_estimators_empty_data_messages": _NO_VALIDATION_IN_FIT,
    "check_estimators_nan_inf": _NO_VALIDATION_IN_FIT,
    "check_estimator_sparse_tag": _NO_VALIDATION_IN_FIT,
    "check_fit1d": _NO_VALIDATION_IN_FIT,
    "check_n_features_in": "n_features_in_ counts table columns; the input is images, which have none",
    "check_n_features_in_after_fitting": "n_features_in_ counts table columns; the input is images, which have none",
}


@parametrize_with_checks([_TabularTagged(**TINY_PARAMS)], expected_failed_checks=lambda est: SKIPPED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def pickled_modules(blob: bytes) -> set[str]:
    """Modules whose objects a pickle references (its STACK_GLOBAL/GLOBAL opcodes)."""
    import pickletools

    strings, modules = [], set()
    for op, arg, _ in pickletools.genops(blob):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            modules.add(strings[-2])
        elif op.name == "GLOBAL":
            modules.add(arg.split(" ")[0])
    return modules


def test_pickle_holds_no_keras_model(tiny_features):
    deep = DeepFeatures.from_provenance(tiny_features.provenance)
    deep.transform(list(tiny_features.paths[:2]))  # builds the backbone
    assert deep._engine is not None
    blob = pickle.dumps(deep)
    assert len(blob) < 20_000 and not [m for m in pickled_modules(blob) if m.split(".")[0] in ("keras", "tensorflow")]
    assert deep._engine is not None, "pickling must not drop the live engine"
    restored = pickle.loads(blob)
    np.testing.assert_array_equal(restored.transform(list(tiny_features.paths[:2])), tiny_features.X[:2])


def test_weights_are_verified_against_the_recorded_sha256(tmp_path):
    other = tmp_path / "other.weights.h5"
    other.write_bytes(b"some other weights")
    deep = DeepFeatures(weights=str(other), image_size=32, weights_identity="file:sha256:" + "ab" * 32).fit()
    with pytest.raises(WeightsError, match="are not the weights these features were made with"):
        deep.transform(np.zeros((1, 32, 32, 3), np.uint8))
    random_model = DeepFeatures(weights=None, image_size=32, weights_identity="file:sha256:" + "ab" * 32).fit()
    with pytest.raises(WeightsError, match="features__weights"):
        random_model.transform(np.zeros((1, 32, 32, 3), np.uint8))


@pytest.mark.slow
def test_real_vgg16_weights_reproduce_the_store_and_are_verified(tmp_path, real_images, vgg16_weights):
    paths = real_images["fractured"][:2] + real_images["not_fractured"][:2]
    fs = extract(paths, labels=[1, 1, 0, 0], store=tmp_path / "store", backbone="vgg16", weights=vgg16_weights,
                 image_size=64, progress=False)
    assert fs.provenance["weights"].startswith("file:sha256:")
    deep = DeepFeatures.from_provenance(fs.provenance)
    np.testing.assert_array_equal(deep.transform([str(p) for p in paths]), fs.X)
    tampered = tmp_path / "tampered.weights.h5"
    shutil.copy(vgg16_weights, tampered)
    with open(tampered, "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsError, match=fs.provenance["weights"]):
        DeepFeatures.from_provenance(fs.provenance, weights=tampered).transform([str(paths[0])])


@pytest.mark.slow
def test_joblib_round_trip_in_a_fresh_process_without_the_store(tiny_features, tmp_path, python, subprocess_env):
    import joblib

    images = tmp_path / "images"
    images.mkdir()
    paths = [str(shutil.copy(p, images)) for p in tiny_features.paths[:5]]
    # The model is trained on its own copy of the store, which is then deleted.
    store = tmp_path / "store"
    rows = tiny_features.subset(np.r_[0:12, 24:36])
    fs = extract(list(rows.paths), labels=list(rows.y), groups=list(rows.groups), store=store, **TINY)
    result = fit(fs, classifier="logreg", n_trials=2, cv=3)
    model = tmp_path / "model.joblib"
    joblib.dump(result.pipeline, model)
    shutil.rmtree(store)
    expected = result.pipeline.predict_proba(paths)
    assert model.stat().st_size < 100_000, "the file holds the classifier, not the CNN"
    code = (
        "import json, sys, joblib\n"
        f"pipe = joblib.load({str(model)!r})\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules, 'loading must not build the CNN'\n"
        f"proba = pipe.predict_proba({paths!r})\n"
        "print(json.dumps({'proba': proba.tolist(), 'version': pipe[0].trained_on_['version']}))\n"
    )
    out = subprocess.run([python, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["proba"], expected, rtol=1e-6)
    assert got["version"] == fs.version


@pytest.mark.slow
def test_works_inside_other_sklearn_code(tiny_features):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score

    fs = tiny_features
    pipe = fit(fs, n_trials=2, cv=3).pipeline
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    on_features = cross_val_score(pipe[1:], fs.X, fs.y, cv=cv, scoring="roc_auc")
    assert on_features.shape == (3,)
    grid = GridSearchCV(pipe[1:], {"classifier__C": [0.01, 1.0]}, cv=cv, scoring="roc_auc").fit(fs.X, fs.y)
    assert grid.best_params_["classifier__C"] in (0.01, 1.0)
    calibrated = CalibratedClassifierCV(pipe[1:], cv=3).fit(fs.X, fs.y)
    assert calibrated.predict_proba(fs.X).shape == (len(fs), 2)
    # The whole Pipeline, cloned per fold, reads the images itself.
    on_images = cross_val_score(clone(pipe), list(fs.paths), fs.y, cv=cv, scoring="roc_auc")
    np.testing.assert_allclose(on_images, on_features, rtol=1e-6)
