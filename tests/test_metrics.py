"""evaluate(): stable metric keys, per split, on feature rows or on images (a folder with a bad file)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from conftest import TINY
from fracfeat import METRIC_KEYS, ConfigError, evaluate, extract, fit
from fracfeat._metrics import binary_metrics


@pytest.fixture(scope="module")
def fitted(tiny_features):
    return fit(tiny_features, n_trials=2, cv=3)


def test_keys_are_stable_and_values_agree_with_sklearn(fitted, tiny_features):
    report = evaluate(fitted, tiny_features)
    assert list(report) == ["all"] and tuple(report["all"]) == METRIC_KEYS
    m = report["all"]
    head = fitted.pipeline[1:]
    pred, proba = head.predict(tiny_features.X), head.predict_proba(tiny_features.X)[:, 1]
    y = tiny_features.y
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, proba))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["recall"] == m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, proba))
    prob_true, prob_pred = calibration_curve(y, proba, n_bins=10, strategy="uniform")  # the non-empty bins
    counts = np.bincount(np.minimum((proba * 10).astype(int), 9), minlength=10)
    assert m["ece"] == pytest.approx(float(np.sum(counts[counts > 0] * np.abs(prob_pred - prob_true)) / len(y)))
    assert m["n"] == 48 and m["n_positive"] == 24 and m["n_failed"] == 0
    assert set(m["classification_report"]) >= {"fractured", "not_fractured", "accuracy"}
    json.dumps(report)  # plain values a script can store


def test_per_split_on_feature_rows_and_one_split(fitted, tiny_features):
    splits = np.array((["train"] * 4 + ["val"] + ["test"]) * 8)
    fs = replace(tiny_features, splits=splits)
    report = evaluate(fitted.pipeline, fs)
    assert list(report) == ["train", "val", "test"]
    assert report["test"]["n"] == 8 and sum(r["n"] for r in report.values()) == 48
    assert evaluate(fitted.pipeline, fs, split="val") == report["val"]
    with pytest.raises(ConfigError, match="split='holdout'"):
        evaluate(fitted.pipeline, fs, split="holdout")


def test_on_a_split_folder_of_images_with_a_damaged_file(fitted, tmp_path, real_images):
    root = tmp_path / "data"
    for split, take in (("train", slice(0, 3)), ("test", slice(3, 6))):
        for label, paths in real_images.items():
            (root / split / label).mkdir(parents=True)
            for p in paths[take]:
                shutil.copy(p, root / split / label / p.name)
    (root / "test" / "fractured" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    report = evaluate(fitted.pipeline, root)
    assert list(report) == ["train", "test"]
    assert report["test"]["n"] == 6 and report["test"]["n_failed"] == 1 and report["train"]["n_failed"] == 0
    # The same images as feature rows give the same numbers.
    fs = extract(root, store=tmp_path / "store", **TINY)
    assert evaluate(fitted.pipeline, fs)["test"]["roc_auc"] == pytest.approx(report["test"]["roc_auc"])
    assert evaluate(fitted.pipeline, tmp_path / "store")["train"] == evaluate(fitted.pipeline, fs)["train"]


def test_a_saved_model_file_is_accepted(fitted, tiny_features, tmp_path):
    path = fitted.save(tmp_path / "model.joblib")
    assert evaluate(path, tiny_features) == evaluate(fitted, tiny_features)


def test_features_from_another_extractor_are_refused(fitted, tiny_features):
    other = dict(tiny_features.provenance, fingerprint="0" * 64, image_size=64)
    with pytest.raises(ConfigError, match="another extractor"):
        evaluate(fitted, replace(tiny_features, provenance=other))


def test_undefined_metrics_are_none_not_errors():
    m = binary_metrics([0, 0, 0], [0, 0, 0], [0.1, 0.2, 0.3])
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["balanced_accuracy"] is None
    assert m["sensitivity"] is None and m["precision"] is None and m["cohen_kappa"] is None
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0 and m["confusion_matrix"] == [[3, 0], [0, 0]]


def test_ranking_alarm_is_a_test_against_chance():
    from fracfeat._metrics import ranking_alarm

    # 0.40 on 19 normal images is within chance; on 800 images it is not.
    assert ranking_alarm(0.40, 221, 19, "x") is None
    assert "ranks inversely on x" in ranking_alarm(0.40, 143, 673, "x")
    assert ranking_alarm(0.55, 143, 673, "x") is None and ranking_alarm(None, 10, 10, "x") is None
    assert ranking_alarm(0.0, 5, 0, "x") is None  # one class: no ROC AUC to judge


@pytest.fixture(scope="module")
def flipped(tiny_features):
    """The training rows with every label swapped: the fitted model must rank them inversely."""
    return replace(tiny_features, y=1 - tiny_features.y)


def test_a_model_that_ranks_inversely_is_reported_in_plain_words(fitted, flipped, tmp_path, caplog):
    from fracfeat import report

    with caplog.at_level("WARNING", logger="fracfeat"):
        metrics = evaluate(fitted, flipped)
    assert metrics["all"]["roc_auc"] < 0.3
    assert "The model ranks inversely on every image" in caplog.text and "do not use its predictions" in caplog.text
    page, _ = report(fitted, flipped, tmp_path / "report")
    assert "The model ranks inversely" in page.read_text()

    caplog.clear()
    with caplog.at_level("WARNING", logger="fracfeat"):
        evaluate(fitted, replace(flipped, y=1 - flipped.y))  # the true labels
    assert "ranks inversely" not in caplog.text


def test_the_cli_warns_when_a_model_ranks_inversely(fitted, flipped, tmp_path, python, subprocess_env):
    import csv
    import subprocess

    model = tmp_path / "m.joblib"
    fitted.save(model)
    manifest = tmp_path / "swapped.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((p, flipped.classes[int(k)]) for p, k in zip(flipped.paths, flipped.y))
    r = subprocess.run([python, "-m", "fracfeat", "evaluate", str(model), str(manifest)], env=subprocess_env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: The model ranks inversely" in r.stderr
