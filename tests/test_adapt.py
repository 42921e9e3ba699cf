"""adapt and recalibrate: a FracAtlas-trained model taken to another site's real radiographs (HBFMID)."""

from __future__ import annotations

import copy
import csv
import json
import logging
import subprocess

import joblib
import numpy as np
import pytest

import fracfeat
from fracfeat import (ConfigError, ModelError, adapt, evaluate, extract, fit, load_model, predict, recalibrate,
                      save_model)

from conftest import REPO, SHARED, TINY

HBFMID = SHARED / "data" / "hbfmid"
N_SITE = 40  # HBFMID images the tests adapt on (with min_images lowered to 30)


@pytest.fixture(scope="module")
def site_images() -> list:
    """The first N_SITE HBFMID radiographs of its manifest (real files of another source)."""
    if not (HBFMID / "manifest.csv").is_file():
        pytest.skip(f"HBFMID radiographs not found at {HBFMID}")
    with open(HBFMID / "manifest.csv", newline="") as f:
        return [str(HBFMID / r["path"]) for r in list(csv.DictReader(f))[:N_SITE]]


@pytest.fixture(scope="module")
def model(tiny_features):
    """A small logreg with its kept threshold and shift alarm, fitted on 48 real FracAtlas radiographs."""
    return fit(tiny_features, classifier="logreg", n_trials=2, cv=3, threshold="balanced_accuracy").pipeline


@pytest.fixture(scope="module")
def adapted(model, site_images):
    return adapt(model, site_images, min_images=30)


def run_cli(python, env, *args):
    return subprocess.run([python, "-m", "fracfeat", "-q", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


# -- adapt -------------------------------------------------------------------------------------------

def test_adapt_moves_the_sites_feature_means_onto_the_training_means(model, adapted, site_images):
    raw = adapted[:1].transform(site_images)
    moved = adapted[:2].transform(site_images)  # feature step, then the site step
    alarm = model.outside_training_
    assert [name for name, _ in adapted.steps][:2] == ["features", "site"]
    assert np.abs(raw.mean(axis=0) - alarm.mean_).max() > 10 * np.abs(moved.mean(axis=0) - alarm.mean_).max()
    np.testing.assert_allclose(moved.mean(axis=0), alarm.mean_, atol=1e-3 * float(alarm.scale_.max()))
    varying = raw.std(axis=0) > 0  # features constant over the site images stay constant
    np.testing.assert_allclose(moved.std(axis=0)[varying], alarm.scale_[varying], rtol=1e-3)
    info = adapted.adapted_to_
    assert info["n_images"] == N_SITE and info["method"] == "standardize" and info["statistics"] == "shift alarm"
    assert len(info["ids_sha256"]) == 64 and info["date"]
    assert 0 <= info["outside_training_after"] <= 1 and 0 <= info["outside_training_before"] <= 1
    assert adapted.outside_training_ is not model.outside_training_  # kept, as a copy
    assert adapted.outside_training_.threshold_ == model.outside_training_.threshold_


def test_adapt_leaves_the_input_model_alone_and_warns_about_the_fracture_rate(model, site_images, caplog):
    before = [name for name, _ in model.steps]
    with caplog.at_level(logging.WARNING, logger="fracfeat"):
        adapt(model, site_images, min_images=30)
    assert [name for name, _ in model.steps] == before and not hasattr(model, "adapted_to_")
    assert any("same share of fractures as the training images" in r.getMessage() for r in caplog.records)


def test_adapting_again_replaces_the_site_step(adapted, site_images):
    again = adapt(adapted, site_images[:35], min_images=30)
    assert [name for name, _ in again.steps].count("site") == 1
    assert again.adapted_to_["n_images"] == 35
    assert again.adapted_to_["ids_sha256"] != adapted.adapted_to_["ids_sha256"]


def test_adapt_refuses_too_few_images_by_default(model, site_images):
    with pytest.raises(ConfigError, match="too noisy.*at least 100 images"):
        adapt(model, site_images)


def test_adapt_refuses_models_without_a_feature_step_or_training_statistics(model, site_images):
    with pytest.raises(ConfigError, match="first step reads images"):
        adapt(model[1:], site_images, min_images=30)
    bare = copy.deepcopy(model)
    del bare.outside_training_
    bare.steps[1] = ("scale", "passthrough")
    with pytest.raises(ConfigError, match="saved before fracfeat 0.3"):
        adapt(bare, site_images, min_images=30)


def test_a_model_saved_by_fracfeat_0_1_adapts_from_its_scaler(site_images):
    old = load_model(REPO / "tests" / "data" / "models" / "fracfeat-0.1.0-svm.joblib")
    adapted = adapt(old, site_images, min_images=30)
    assert adapted.adapted_to_["statistics"] == "StandardScaler"
    assert adapted.adapted_to_["outside_training_before"] is None  # 0.1 models have no shift alarm
    assert len(predict(adapted, site_images[:2])) == 2


def test_adapted_model_saved_by_the_cli_gives_the_same_probabilities_in_a_fresh_process(
        model, site_images, tmp_path, python, subprocess_env):
    save_model(model, tmp_path / "model.joblib")
    site = extract(site_images, store=tmp_path / "site-store", **TINY)  # the model's extractor: same fingerprint
    done = run_cli(python, subprocess_env, "adapt", tmp_path / "model.joblib", f"{site.store}@{site.version}",
                   "--out", tmp_path / "adapted.joblib", "--min-images", "30")
    assert done.returncode == 0, done.stderr
    assert "images flagged" in done.stdout and "same share of fractures" in done.stderr
    shown = run_cli(python, subprocess_env, "predict", tmp_path / "adapted.joblib", *site_images[:4],
                    "--format", "json")
    assert shown.returncode == 0, shown.stderr
    here = predict(load_model(tmp_path / "adapted.joblib"), site_images[:4])
    assert [r["probability"] for r in json.loads(shown.stdout)] == [r["probability"] for r in here]
    in_process = adapt(model, site_images, min_images=30)  # from the images themselves: the same model
    np.testing.assert_allclose([r["probability"] for r in here],
                               in_process.predict_proba(site_images[:4])[:, 1], atol=1e-6)
    assert joblib.load(tmp_path / "adapted.joblib").adapted_to_["ids_sha256"] == in_process.adapted_to_["ids_sha256"]


# -- recalibrate -------------------------------------------------------------------------------------

def test_recalibrate_gives_a_positive_slope_and_no_worse_brier(model, tiny_features):
    model = recalibrate(model, tiny_features, min_labels=40, n_boot=200)
    r = model.recalibrated_to_
    assert r["slope"] > 0 and r["slope_low"] > 0 and r["slope_high"] >= r["slope"] >= r["slope_low"]
    assert r["brier_after"] <= r["brier_before"] + 1e-9
    assert 0 < r["threshold_low"] <= r["threshold"] <= r["threshold_high"] < 1
    assert r["n_labels"] == 48 and r["grouped"] and r["resampled"] == "groups"
    for key in ("roc_auc", "sensitivity", "specificity"):
        assert r[key]["low"] <= r[key]["value"] <= r[key]["high"]
    assert type(model.steps[-1][1]).__name__ == "FixedThresholdClassifier"
    assert model.steps[-1][1].threshold == r["threshold"]
    metrics = evaluate(model, tiny_features, split="all")
    assert metrics["brier"] == pytest.approx(r["brier_after"], abs=1e-6)
    again = recalibrate(model, tiny_features, min_labels=40, n_boot=50, method="isotonic")
    assert type(again.steps[-1][1].estimator_.estimator).__name__ != "LocalCalibration"  # replaced, not stacked


def test_recalibrate_refuses_too_few_labels(model, tiny_features):
    with pytest.raises(ConfigError, match="only 48 labeled images.*at least 50"):
        recalibrate(model, tiny_features)
    few = tiny_features.subset(np.r_[0:24, 24:30])
    with pytest.raises(ConfigError, match=r"6 not fractured.*10 of each class"):
        recalibrate(model, few, min_labels=20)


def _labeled_csv(path, fs, labels):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for image, label, group in zip(fs.paths, labels, fs.groups):
            w.writerow([image, ("not_fractured", "fractured")[int(label)], group])
    return path


def test_recalibrate_refuses_a_model_that_ranks_the_images_backwards_unless_forced(model, tiny_features, tmp_path):
    # Swapped labels are what a model that ranks a site backwards looks like; read from a labeled CSV.
    swapped = _labeled_csv(tmp_path / "swapped.csv", tiny_features, 1 - np.asarray(tiny_features.y))
    with pytest.raises(ModelError, match="does not rank these images.*force=True"):
        recalibrate(model, swapped, min_labels=40, n_boot=100)
    forced = recalibrate(model, swapped, min_labels=40, n_boot=100, force=True)
    assert forced.recalibrated_to_["slope"] < 0 and forced.recalibrated_to_["grouped"]


def test_recalibrate_cli_prints_its_table_and_refuses_too_few_labels(model, tiny_features, tmp_path, python,
                                                                     subprocess_env):
    save_model(model, tmp_path / "model.joblib")
    labeled = f"{tiny_features.store}@{tiny_features.version}"
    done = run_cli(python, subprocess_env, "recalibrate", tmp_path / "model.joblib", labeled,
                   "--out", tmp_path / "local.joblib", "--min-labels", "40")
    assert done.returncode == 0, done.stderr
    assert "Platt slope" in done.stdout and "sensitivity (oof)" in done.stdout
    assert load_model(tmp_path / "local.joblib").recalibrated_to_["n_labels"] == 48
    refused = run_cli(python, subprocess_env, "recalibrate", tmp_path / "model.joblib", labeled,
                      "--out", tmp_path / "bad.joblib")
    assert refused.returncode == 1 and "only 48 labeled images" in refused.stderr
    assert len([line for line in refused.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "bad.joblib").exists()


def test_adapt_and_recalibrate_are_public():
    assert {"adapt", "recalibrate"} <= set(fracfeat.__all__)
    assert fracfeat.adapt is adapt and fracfeat.recalibrate is recalibrate
