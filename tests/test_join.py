"""Joined features: several extractors' features side by side, from extract(join=) to a Pipeline that reads images."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from sklearn.base import clone

from fracfeat import ConfigError, FeatureStore, Preset, evaluate, extract, fit, join_features, run
from fracfeat._presets import check_features
from fracfeat._transformer import JoinedFeatures

from conftest import TINY
from test_cli import assert_user_error
from test_cli import fracfeat as fracfeat_cli

# Mirrors the shape of the best preset (intermediate layers at one size, the final layer at a larger one),
# at sizes that keep a forward pass cheap.
PARTS = [dict(image_size=32, layers=("block3_pool",)), dict(image_size=48)]
SETTINGS = {k: v for k, v in TINY.items() if k != "image_size"}


def _paths_and_labels(real_images):
    paths = [*real_images["fractured"], *real_images["not_fractured"]]
    return paths, ["fractured"] * len(real_images["fractured"]) + ["not_fractured"] * len(real_images["not_fractured"])


@pytest.fixture(scope="module")
def joined(tmp_path_factory, real_images):
    """extract(join=PARTS) of 12 real radiographs into a fresh store: (FeatureSet, store, paths, labels)."""
    paths, labels = _paths_and_labels(real_images)
    store = tmp_path_factory.mktemp("joined") / "store"
    return extract(paths, labels=labels, store=store, join=PARTS, **SETTINGS), FeatureStore(store), paths, labels


def test_extract_join_writes_one_version_per_part_and_returns_them_side_by_side(joined):
    fs, store, paths, labels = joined
    assert [v.version for v in store.versions()] == [1, 2]
    first, second = store.open(1), store.open(2)
    assert first.provenance["layers"] == ["block3_pool"] and second.provenance["image_size"] == 48
    assert fs.n_features == first.n_features + second.n_features == 256 + 512 + 512
    np.testing.assert_array_equal(fs.X, np.hstack([first.X, second.X]))
    assert fs.version is None and fs.version_label == "1+2" and "joined versions 1+2" in repr(fs)
    assert fs.fingerprint == f"{first.fingerprint}+{second.fingerprint}"
    assert [p["version"] for p in fs.provenance["parts"]] == [1, 2]
    # The store reference "1+2" is the same joined set; a second extraction computes nothing new.
    np.testing.assert_array_equal(store.open("1+2").X, fs.X)
    again = extract(paths, labels=labels, store=store.root, join=PARTS, **SETTINGS)
    assert [v.version for v in store.versions()] == [1, 2] and again.version_label == "1+2"


def test_join_features_matches_rows_by_image_id(joined):
    fs, store, _, _ = joined
    first, second = store.open(1), store.open(2)
    shuffled = second.subset(np.arange(len(second))[::-1])
    both = join_features(first, shuffled)
    np.testing.assert_array_equal(both.X, fs.X)
    np.testing.assert_array_equal(both.y, first.y)


def test_join_features_refuses_what_it_cannot_join(joined):
    fs, store, _, _ = joined
    first, second = store.open(1), store.open(2)
    with pytest.raises(ConfigError, match="lacks 3 of the 12 images of the first; extract the same images"):
        join_features(first, second.subset(np.arange(9)))
    with pytest.raises(ConfigError, match="two or more FeatureSets"):
        join_features(first)
    with pytest.raises(ConfigError, match="two or more FeatureSets"):
        join_features(first, second.X)
    with pytest.raises(ConfigError, match="already joined: pass its parts"):
        join_features(fs, first)


@pytest.mark.parametrize("join, words", [
    ([dict(image_size=32)], "two or more parts"),
    (dict(image_size=32), "a list of dicts"),
    ([dict(image_size=32), dict(weights=None)], "part 2 sets weights: a part may change only backbone"),
    ([dict(image_size=32, view="hflip"), dict(image_size=48)], "part 1 sets view"),
    ([dict(image_size=32), dict(image_size=32)], "part 2 repeats part 1"),
])
def test_extract_refuses_bad_join_before_reading_images(tmp_path, join, words):
    with pytest.raises(ConfigError, match=words):
        extract(tmp_path / "no-such-folder", store=tmp_path / "store", join=join, **SETTINGS)


def test_extract_refuses_a_setting_given_beside_parts_that_set_it(tmp_path, real_images):
    # The parts' image_size would silently win over the one asked for.
    with pytest.raises(ConfigError, match=r"image_size=64 is given beside join parts that set image_size"):
        extract(real_images["fractured"][:1], store=tmp_path / "store", join=PARTS, **{**TINY, "image_size": 64})
    assert not (tmp_path / "store").exists()


def test_fit_on_joined_features_gives_a_pipeline_that_reads_images(joined, class_folder, tmp_path):
    fs, store, paths, _ = joined
    result = fit(fs, classifier="logreg", n_trials=2, cv=2, progress=False)
    pipeline = result.pipeline
    step = pipeline.named_steps["features"]
    assert isinstance(step, JoinedFeatures) and len(step.parts) == 2
    assert step.fingerprint_ == fs.fingerprint and result.version == "1+2"
    assert step.trained_on_["version"] == "1+2"
    # The images give the stored rows again, so the Pipeline scores images as fit scored the rows.
    np.testing.assert_allclose(step.transform(paths), fs.X, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pipeline.predict_proba(paths), pipeline[1:].predict_proba(fs.X), rtol=1e-6)
    clone(pipeline)
    joblib.dump(pipeline, tmp_path / "model.joblib")
    loaded = joblib.load(tmp_path / "model.joblib")
    np.testing.assert_allclose(loaded.predict_proba(paths), pipeline.predict_proba(paths), rtol=1e-6)
    # evaluate: on the joined rows and on the images alike; on one part's rows, a clear refusal.
    on_rows, on_images = evaluate(loaded, store.open("1+2")), evaluate(loaded, class_folder)
    assert on_rows["all"]["roc_auc"] == pytest.approx(on_images["all"]["roc_auc"])
    with pytest.raises(ConfigError, match=r"another extractor .*vgg16 32px avg\) than the model's .*"
                                          r"vgg16 32px avg \+ vgg16 48px avg"):
        evaluate(loaded, store.open(1))


def test_evaluate_a_joined_model_on_a_folder_with_a_damaged_file(joined, class_folder):
    fs = joined[0]
    pipeline = fit(fs, classifier="logreg", n_trials=2, cv=2, progress=False).pipeline
    damaged = class_folder / "fractured" / "damaged.jpg"
    damaged.write_bytes(b"not a jpeg")
    metrics = evaluate(pipeline, class_folder)
    assert metrics["all"]["n"] == 12 and metrics["all"]["n_failed"] == 1


def _joined_preset(**fit_settings) -> Preset:
    return Preset(name="test-joined", description="two tiny extractors joined",
                  extract=dict(backbone="vgg16", pooling="avg", join=tuple(PARTS)),
                  fit=dict(classifier="logreg", n_trials=2, cv=2, **fit_settings), measured="nowhere: a test")


def test_a_preset_can_join_extractors_and_fit_checks_the_parts(joined, tmp_path):
    _, store, paths, labels = joined
    preset = _joined_preset()
    made = extract(paths, labels=labels, store=store.root, preset=preset, weights=None, progress=False)
    assert made.version_label == "1+2"  # the preset's parts are the cached versions
    check_features(preset, made)
    assert isinstance(fit(made, preset=preset, progress=False).pipeline[0], JoinedFeatures)
    with pytest.raises(ConfigError, match="joins the features of 2 extractor.*these features come from 1"):
        fit(store.open(2), preset=preset, progress=False)
    swapped = join_features(store.open(2), store.open(1))
    with pytest.raises(ConfigError, match=r"part 1: image_size=48 \(the preset's: 32\)"):
        fit(swapped, preset=preset, progress=False)


def test_run_with_a_joined_preset_and_augmented_views(class_folder, tmp_path):
    result = run(class_folder, tmp_path / "out", preset=_joined_preset(), weights=None, augment=("hflip",),
                 progress=False)
    assert isinstance(result.fit.pipeline[0], JoinedFeatures)
    assert result.fit.augment == ("hflip",) and result.features.version_label == "1+2"
    page = result.report_path.read_text()
    assert "v1+2 (joined)" in page and "hflip" in page
    model = joblib.load(result.model_path)
    assert model.predict(sorted(str(p) for p in (class_folder / "fractured").iterdir())).shape == (6,)


def test_augment_refuses_views_of_another_join(joined, tmp_path):
    fs, _, paths, _ = joined
    single_view = extract(paths, store=tmp_path / "views", view="hflip", image_size=32, **SETTINGS)
    with pytest.raises(ConfigError, match="joins 1 extractors' features, the training features 2"):
        fit(fs, classifier="logreg", n_trials=1, cv=2, augment=[single_view], progress=False)


@pytest.mark.slow
def test_cli_fits_joined_store_versions(python, subprocess_env, joined, class_folder, tmp_path):
    store = joined[1]
    model = tmp_path / "model.joblib"
    r = fracfeat_cli(python, subprocess_env, "fit", f"{store.root}@1+2", "--classifier", "logreg", "--trials", "2",
                     "--cv", "2", "--out", model, "-q")
    assert r.returncode == 0, r.stderr
    assert f"trained on {store.root} v1+2, 12 images" in r.stdout
    r = fracfeat_cli(python, subprocess_env, "evaluate", model, class_folder, "-q")
    assert r.returncode == 0, r.stderr
    assert "roc_auc" in r.stdout


@pytest.mark.slow
def test_cli_extracts_fits_and_predicts_with_the_joined_preset(python, subprocess_env, class_folder, tmp_path):
    """The best preset by name, end to end at its real sizes (random weights keep it cheap)."""
    store, model = tmp_path / "store", tmp_path / "model.joblib"
    name = "fracatlas-vgg16-ml34-448-svm"
    r = fracfeat_cli(python, subprocess_env, "extract", class_folder, "--store", store, "--weights", "none",
                     "--preset", name, "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "v1  12 images x 1280 features  (12 computed, 0 from cache" in lines[0]
    assert "v2  12 images x 512 features  (12 computed, 0 from cache" in lines[1]
    assert f"joined v1+2  12 images x 1792 features (fit it as {store}@1+2)" in lines[2]
    r = fracfeat_cli(python, subprocess_env, "fit", f"{store}@1+2", "--preset", name, "--trials", "2", "--cv", "2",
                     "--out", model, "-q")
    assert r.returncode == 0, r.stderr
    assert "svm: CV roc_auc" in r.stdout and "v1+2, 12 images" in r.stdout
    r = fracfeat_cli(python, subprocess_env, "fit", f"{store}@2", "--preset", name, "--out", model, "-q")
    assert_user_error(r, "joins the features of 2 extractor(s); these features come from 1")
    image = next((class_folder / "fractured").iterdir())
    r = fracfeat_cli(python, subprocess_env, "predict", model, image, "-q")
    assert r.returncode == 0, r.stderr
    assert image.name in r.stdout
