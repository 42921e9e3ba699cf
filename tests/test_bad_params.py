"""Bad parameters users can pass: each a clear error naming the problem and the fix, before any heavy work."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from fracfeat import ConfigError, SourceError, WeightsError, extract
from fracfeat._errors import FeatureError


@pytest.fixture()
def one_image(real_images) -> list[str]:
    return [str(real_images["fractured"][0])]


@pytest.mark.parametrize(
    "params, error, message",
    [
        (dict(backbone="vgg61"), ConfigError, r"unknown backbone 'vgg61': did you mean vgg19 or vgg16\? `fracfeat backbones` lists"),
        (dict(image_size=16), ConfigError, r"image_size=16 is below vgg16's minimum of 32 pixels.*pass image_size >= 32"),
        (dict(image_size=32.5), ConfigError, r"image_size must be an integer number of pixels, not 32.5"),
        (dict(image_size="big"), ConfigError, r"image_size must be an integer number of pixels, not 'big'"),
        (dict(pooling="mean"), ConfigError, r"pooling='mean': choose one of avg, max, none"),
        (dict(precision="int4"), ConfigError, r"precision='int4': choose one of auto, float32"),
        (dict(precision="int8"), ConfigError, r"precision='int8' needs a quantized model.*fracfeat quantize"),
        (dict(truncated="skip"), ConfigError, r"truncated='skip': choose one of read, reject"),
        (dict(batch_size=0), ConfigError, r"batch_size=0: give a positive integer"),
        (dict(checkpoint_every=0), ConfigError, r"checkpoint_every=0: give a positive integer"),
        (dict(image_size=100000), ConfigError, r"image_size=100000 is above the 2048 px fracfeat takes.*pass image_size"),
        (dict(image_size=1024, tiles=4), ConfigError, r"tiles=4 of 1024 px make a 2560 px image.*above the 2048 px"),
        (dict(weights="/nonexistent/vgg16.h5"), WeightsError, r"weights file '/nonexistent/vgg16.h5' not found: pass"),
    ],
)
def test_bad_setting_is_refused_before_keras_loads(one_image, tmp_path, params, error, message):
    settings = {**TINY, **params}
    with pytest.raises(error, match=message):
        extract(one_image, store=tmp_path / "store", **settings)
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_bad_settings_do_not_import_keras(tmp_path, one_image, python, subprocess_env):
    import subprocess

    code = ("import sys, fracfeat\n"
            "try:\n    fracfeat.extract(sys.argv[1:], backbone='vgg61', store=sys.argv[1] + '.store')\n"
            "except fracfeat.ConfigError:\n    pass\n"
            "print('keras' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([python, "-c", code, *one_image], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


@pytest.mark.parametrize("make, message", [
    (lambda d: d, r"holds no images \(looked for"),  # an empty folder
    (lambda d: [(d / "fractured").mkdir(), (d / "not_fractured").mkdir(), d][-1], r"holds no images"),
    (lambda d: [(d / "m.csv").write_text("path,label\n"), d / "m.csv"][-1], r"holds no images"),
    (lambda d: [], r"holds no images"),
])
def test_empty_source(tmp_path, make, message):
    d = tmp_path / "src"
    d.mkdir()
    with pytest.raises(SourceError, match=message):
        extract(make(d), store=tmp_path / "store", **TINY)


def test_missing_source_says_what_to_pass(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist: pass a folder of images, a CSV manifest, or a list"):
        extract(tmp_path / "nowhere", store=tmp_path / "store", **TINY)


def test_csv_without_path_column(tmp_path, one_image):
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"picture,label\n{one_image[0]},fractured\n")
    with pytest.raises(SourceError, match=r"manifest\.csv: no path column\. Found columns \['picture', 'label'\]; "
                                          r"name the column of image paths one of \['path'"):
        extract(csv, store=tmp_path / "store", **TINY)


def test_unmappable_labels(tmp_path, one_image):
    import shutil

    folder = tmp_path / "dataset"
    (folder / "broken").mkdir(parents=True)
    shutil.copy(one_image[0], folder / "broken")
    with pytest.raises(SourceError, match=r"cannot tell whether class 'broken' means fractured or not fractured.*"
                                          r"class_map=\{'broken': 1 or 0"):
        extract(folder, store=tmp_path / "store", **TINY)
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,label\n{one_image[0]},maybe\n")
    with pytest.raises(SourceError, match=r"m\.csv, line 2: cannot tell whether class 'maybe'"):
        extract(csv, store=tmp_path / "store", **TINY)
    with pytest.raises(SourceError, match=r"labels\[0\] = 2: use 1 \(fractured\), 0 \(not fractured\) or -1"):
        extract(one_image, labels=[2], store=tmp_path / "store", **TINY)
    with pytest.raises(SourceError, match=r"class_map\['broken'\] = 'yes': labels must be 1 \(fractured\) or 0"):
        extract(folder, class_map={"broken": "yes"}, store=tmp_path / "store", **TINY)
    with pytest.raises(SourceError, match=r"labels has 2 entries but there are 1 paths; give one per path"):
        extract(one_image, labels=[1, 0], store=tmp_path / "store", **TINY)


# -- manifests: encoding and path cells (issue 19, items 14 and 15) ------------------------------------------

def test_manifest_that_is_not_utf8_names_the_line_and_the_fix(tmp_path, one_image):
    csv = tmp_path / "m.csv"
    csv.write_bytes(f"path,label\n{one_image[0]},fractured\nRöntgen.jpg,fractured\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"m\.csv, line 3: not UTF-8 \(byte 0xf6.*save the manifest as UTF-8"):
        extract(csv, store=tmp_path / "store", **TINY)
    # UTF-8 with a byte-order mark (as Excel writes it) is read
    csv.write_bytes(f"path,label\n{one_image[0]},fractured\n".encode("utf-8-sig"))
    assert len(extract(csv, store=tmp_path / "store", **TINY)) == 1


def test_manifest_path_with_a_nul_byte(tmp_path, one_image):
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,label\n{one_image[0]},fractured\nscan\0.jpg,fractured\n")
    with pytest.raises(SourceError, match=r"m\.csv, line 3: the path cell holds a NUL byte"):
        extract(csv, store=tmp_path / "store", **TINY)


def test_manifest_path_cells_are_used_as_written_when_that_file_exists(tmp_path, one_image):
    import shutil

    shutil.copy(one_image[0], tmp_path / " spaced.jpg")
    shutil.copy(one_image[0], tmp_path / "plain.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n spaced.jpg,fractured\n  plain.jpg ,fractured\n")
    fs = extract(csv, store=tmp_path / "store", **TINY)
    assert not fs.failures and sorted(Path(p).name for p in fs.paths) == [" spaced.jpg", "plain.jpg"]


# -- output locations (issue 19, item 12) ------------------------------------------------------------------

def test_run_checks_its_output_folder_before_extracting(tmp_path, one_image):
    from fracfeat import run

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"out .*a_file is a file, not a folder"):
        run(one_image, tmp_path / "a_file", **TINY)
    (tmp_path / "out" / "model.joblib").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"the model file .*model\.joblib is a folder"):
        run(one_image, tmp_path / "out", **TINY)
    assert not (tmp_path / "out" / "store").exists()  # refused before extraction


def test_save_model_checks_the_location_first_and_never_leaves_a_temporary_file(tmp_path, tiny_features):
    from sklearn.linear_model import LogisticRegression

    from fracfeat import ModelError, save_model

    (tmp_path / "a_folder").mkdir()
    model = LogisticRegression().fit(tiny_features.X, tiny_features.y)
    with pytest.raises(ConfigError, match=r"a_folder.* is a folder: give a file path"):
        save_model(model, tmp_path / "a_folder")
    # a save that fails late (the model cannot be pickled) removes its temporary file and says so in one line
    model.unpicklable_ = lambda: None
    with pytest.raises(ModelError, match=r"cannot save the model to .*m\.joblib"):
        save_model(model, tmp_path / "m.joblib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"]


def test_a_killed_save_leaves_no_temporary_file_behind(tmp_path, tiny_features, python, subprocess_env):
    """A save SIGKILLed before its rename leaves its temporary file; the next save to that folder removes it."""
    import subprocess
    import time

    code = ("import sys, numpy as np\nfrom sklearn.linear_model import LogisticRegression\nfrom fracfeat import save_model\n"
            "X = np.random.default_rng(0).normal(size=(20, 4)); y = np.arange(20) % 2\n"
            "save_model(LogisticRegression().fit(X, y), sys.argv[1])\n")
    pause = tmp_path / "paused"
    env = dict(subprocess_env, FRACFEAT_PAUSE_AT="model", FRACFEAT_PAUSE_FILE=str(pause))
    child = subprocess.Popen([python, "-c", code, str(tmp_path / "m.joblib")], env=env)
    deadline = time.monotonic() + 60
    while not pause.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert pause.exists(), "the save never reached its pause point"
    child.kill()
    child.wait()
    pause.unlink()
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1  # what the killed save left
    from sklearn.linear_model import LogisticRegression

    from fracfeat import load_model, save_model

    save_model(LogisticRegression().fit(tiny_features.X, tiny_features.y), tmp_path / "m.joblib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.joblib"]
    assert load_model(tmp_path / "m.joblib").predict_proba(tiny_features.X[:2]).shape == (2, 2)


# -- tuning options (issue 19, item 14) --------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    (dict(scoring="foo"), r"scoring='foo' is not a scikit-learn scorer.*roc_auc"),
    (dict(seed=-1), r"seed=-1: give an integer from 0 to 2\*\*32 - 1"),
    (dict(seed=1.5), r"seed=1.5: give an integer"),
    (dict(storage="bogus://x"), r"storage='bogus://x' is not a storage URL Optuna can open.*sqlite:///"),
])
def test_bad_tuning_option_is_refused_before_tuning(tiny_features, params, message):
    from fracfeat import fit

    with pytest.raises(ConfigError, match=message):
        fit(tiny_features, classifier="logreg", n_trials=100000, cv=2, **params)


# -- NaN and inf features (issue 19, item 13) --------------------------------------------------------------

@pytest.fixture(scope="session")
def inf_weights(tmp_path_factory) -> Path:
    """A VGG16 no-top weights file whose last convolution has one infinite bias: every image gets an
    infinite feature (what damaged weights or an overflowing precision produce)."""
    import keras
    import numpy as np

    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    layer = model.get_layer("block5_conv3")
    kernel, bias = layer.get_weights()
    bias[0] = np.inf
    layer.set_weights([kernel, bias])
    path = tmp_path_factory.mktemp("inf-weights") / "inf.weights.h5"
    model.save_weights(path)
    return path


@pytest.fixture(scope="module")
def inf_store(tmp_path_factory, real_images, inf_weights):
    """A labeled store version of 4 + 4 real radiographs whose rows hold inf (extracted with inf_weights)."""
    paths = real_images["fractured"][:4] + real_images["not_fractured"][:4]
    return extract(paths, labels=[1] * 4 + [0] * 4, store=tmp_path_factory.mktemp("inf") / "store",
                   **{**TINY, "weights": str(inf_weights)})


def test_fit_refuses_non_finite_rows_naming_them(inf_store):
    from fracfeat import fit

    assert not np.isfinite(inf_store.X).all()
    with pytest.raises(FeatureError, match=r"fit: 8 of 8 feature rows hold NaN or inf \(.*\.jpg, .*\.jpg, .*\.jpg "
                                           r"and 5 more\): re-extract .*fracfeat store verify"):
        fit(inf_store, classifier="logreg", n_trials=100000, cv=2)


def test_predict_and_evaluate_refuse_non_finite_features(inf_weights, tiny_features, real_images, class_folder):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from fracfeat import DeepFeatures, evaluate, predict

    deep = DeepFeatures("vgg16", weights=str(inf_weights), image_size=32).fit()
    model = Pipeline([("features", deep), ("classifier", LogisticRegression().fit(tiny_features.X, tiny_features.y))])
    paths = real_images["fractured"][:2]
    with pytest.raises(FeatureError, match=r"2 of 2 images give NaN or inf features \(.*\.jpg, .*\.jpg\)"):
        predict(model, paths)
    with pytest.raises(FeatureError, match=r"12 of 12 images give NaN or inf features"):
        evaluate(model, class_folder)


# -- unreadable images at prediction: the fix the caller has (issue 19, item 15) ----------------------------

def test_predict_on_a_missing_file_names_what_the_caller_can_do(tiny_model_pipeline, real_images, tmp_path):
    from fracfeat import ImageError, predict

    paths = [real_images["fractured"][0], tmp_path / "gone.jpg"]
    with pytest.raises(ImageError, match=r"1 of 2 images cannot be read \(.*gone\.jpg: file not found.*\): fix them "
                                         r"or leave them out of predict's images") as e:
        predict(tiny_model_pipeline, paths)
    assert "strict" not in str(e.value)
    with pytest.raises(ImageError, match=r"DeepFeatures\.transform needs every image.*features_of_paths") as e:
        tiny_model_pipeline.predict_proba([str(p) for p in paths])
    assert "strict" not in str(e.value)


@pytest.fixture()
def tiny_model_pipeline(tiny_features):
    from fracfeat import fit

    return fit(tiny_features, classifier="logreg", n_trials=1, cv=2).pipeline
