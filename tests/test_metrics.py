"""evaluate(): stable metric keys, per split, on feature rows or on images (a folder with a bad file)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from conftest import SHARED, TINY, manifest_rows
from fracfeat import METRIC_KEYS, ConfigError, evaluate, extract, fit
from fracfeat._metrics import (DETAIL_KEYS, INTERVAL_KEYS, binary_metrics, bootstrap_intervals, predict_rows,
                               reliability_curve, shift_alarms)

HBFMID = SHARED / "data" / "hbfmid"


@pytest.fixture(scope="module")
def fitted(tiny_features):
    return fit(tiny_features, n_trials=2, cv=3)


def test_keys_are_stable_and_values_agree_with_sklearn(fitted, tiny_features):
    report = evaluate(fitted, tiny_features)
    assert list(report) == ["all"] and tuple(report["all"]) == METRIC_KEYS + DETAIL_KEYS
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


# -- subgroups, intervals, calibration -------------------------------------------------------------

def two_source_manifest(folder: Path, fracatlas: Path) -> Path:
    """``folder/two_sources.csv``: 16 real FracAtlas radiographs (none of tiny_features'; their manifest's region
    group and view, the projection; the 2 of region hip are all fractured) and 9 HBFMID ones (their groups, no
    region or projection), labeled, with a ``source`` column. Paths point into the shared folders: no image is
    copied."""
    rows = [r for r in manifest_rows() if r["use"] == "1"]
    fractured = [r for r in rows if r["label"] == "fractured"][24:]
    normal = [r for r in rows if r["label"] == "not_fractured"][24:]
    picked = ([r for r in fractured if r["region"] in ("hand", "leg")][:6] + [r for r in fractured if r["region"] == "hip"][:2]
              + [r for r in normal if r["region"] in ("hand", "leg")][:8])
    with open(HBFMID / "manifest.csv", newline="") as f:
        hbfmid = list(csv.DictReader(f))
    others = [r for r in hbfmid if r["label"] == "fractured"][:6] + [r for r in hbfmid if r["label"] == "not_fractured"][:3]
    path = folder / "two_sources.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "source", "region", "view"])
        w.writerows((fracatlas / r["path"], r["label"], r["group"], "fracatlas", r["region"], r["view"])
                    for r in picked)
        w.writerows((HBFMID / r["path"], r["label"], r["group"], "hbfmid", "", "") for r in others)
    return path


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, fracatlas) -> Path:
    if not (HBFMID / "manifest.csv").is_file():
        pytest.skip(f"HBFMID radiographs not found at {HBFMID}")
    return two_source_manifest(tmp_path_factory.mktemp("two-sources"), fracatlas)


def _each_figure_lies_in_its_interval(m: dict) -> None:
    for key in INTERVAL_KEYS:
        if m[key] is None:
            assert m["intervals"][key] is None, key
        else:
            assert m["intervals"][key]["low"] <= m[key] <= m["intervals"][key]["high"], key


def test_per_source_and_per_region_metrics_on_real_images_of_two_sources(fitted, two_sources):
    report = evaluate(fitted, two_sources)
    m = report["all"]
    assert list(m)[-3:] == list(DETAIL_KEYS) and set(m["subgroups"]) == {"source", "region", "projection"}
    for key, values in m["subgroups"].items():  # every image is counted once per grouping
        assert sum(v["n"] for v in values.values()) == m["n"] == 25
        assert sum(v["n_positive"] for v in values.values()) == m["n_positive"] == 14
    source, region = m["subgroups"]["source"], m["subgroups"]["region"]
    assert {k: (v["n"], v["n_positive"]) for k, v in source.items()} == {"fracatlas": (16, 8), "hbfmid": (9, 6)}
    assert set(region) == {"", "hand", "hip", "leg"} and region[""]["n"] == 9
    # Region hip holds fractured images only: what needs both classes is None, the counts are there.
    hip = region["hip"]
    assert (hip["n"], hip["n_positive"], hip["n_negative"]) == (2, 2, 0)
    assert hip["roc_auc"] is None and hip["specificity"] is None and hip["balanced_accuracy"] is None
    assert hip["intervals"]["roc_auc"] is None and hip["intervals"]["sensitivity"] is not None
    for sub in [m, *source.values(), *region.values()]:
        _each_figure_lies_in_its_interval(sub)
    assert m["intervals"]["resampled"] == "groups" and m["intervals"]["n_boot"] == 1000
    # A subgroup's figures are those of its rows.
    rows = predict_rows(fitted, two_sources)
    inside = rows.sources == "hbfmid"
    assert source["hbfmid"]["roc_auc"] == pytest.approx(skm.roc_auc_score(rows.y[inside], rows.score[inside]))
    assert source["hbfmid"]["brier"] == pytest.approx(skm.brier_score_loss(rows.y[inside], rows.score[inside]))
    # Reliability: per split, and per source since there are two; the counts add up to the images.
    assert sum(m["reliability"]["count"]) == 25
    assert [sum(source[s]["reliability"]["count"]) for s in ("fracatlas", "hbfmid")] == [16, 9]
    assert "reliability" not in region["hand"]
    json.dumps(report)
    assert evaluate(fitted, two_sources) == report  # seeded: the same intervals every time


def test_by_picks_the_groupings_and_refuses_unknown_ones(fitted, two_sources, tiny_features, tmp_path):
    assert set(evaluate(fitted, two_sources, by=("region",), n_boot=50)["all"]["subgroups"]) == {"region"}
    with open(two_sources, newline="") as f:
        views = [r["view"] for r in csv.DictReader(f)]
    (per_projection,) = evaluate(fitted, two_sources, by=("projection",), n_boot=50)["all"]["subgroups"].values()
    assert {k: v["n"] for k, v in per_projection.items()} == {k: views.count(k) for k in set(views)}
    from fracfeat import report

    page, _ = report(fitted, two_sources, tmp_path / "report", by=("projection",), n_samples=0, n_boot=50,
                     heatmaps=False)
    assert "<h2>Per projection</h2>" in page.read_text() and "id='per-region'" not in page.read_text()
    assert evaluate(fitted, two_sources, by=(), n_boot=50)["all"]["subgroups"] == {}
    assert evaluate(fitted, tiny_features, n_boot=50)["all"]["subgroups"] == {}  # no source, no region
    with pytest.raises(ConfigError, match="by='ward'.*pick among them"):
        evaluate(fitted, two_sources, by=("ward",))
    with pytest.raises(ConfigError, match="no image of the data has a region"):
        evaluate(fitted, tiny_features, by="region")


def test_group_bootstrap_intervals_are_bootstrap_ci_s_on_real_predictions(fitted, tiny_features):
    from fracfeat._validation import bootstrap_ci

    head = fitted.pipeline[1:]
    y, groups = tiny_features.y, tiny_features.groups
    pred, score = head.predict(tiny_features.X), head.predict_proba(tiny_features.X)[:, 1]
    ours = bootstrap_intervals(y, pred, score, groups, n_boot=100, seed=3)
    theirs = bootstrap_ci(y, score, pred, groups, n_boot=100, seed=3)  # the same resamples, one at a time
    for key in ("roc_auc", "sensitivity", "specificity", "balanced_accuracy"):
        assert ours[key]["low"] == pytest.approx(theirs[key]["low"]) and ours[key]["high"] == pytest.approx(theirs[key]["high"])
    # Brier, by hand over the same resamples of whole groups.
    names = np.unique(groups.astype(str))
    members = [np.flatnonzero(groups == g) for g in names]
    rng = np.random.default_rng(3)
    draws = [np.mean((score[idx] - y[idx]) ** 2) for idx in
             (np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]) for _ in range(100))]
    assert [ours["brier"]["low"], ours["brier"]["high"]] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])))
    assert ours["resampled"] == "groups" and bootstrap_intervals(y, pred, score, n_boot=20)["resampled"] == "images"


def test_reliability_curve_is_sklearn_s_calibration_curve_with_counts(fitted, tiny_features):
    proba = fitted.pipeline[1:].predict_proba(tiny_features.X)[:, 1]
    curve = reliability_curve(tiny_features.y, proba)
    prob_true, prob_pred = calibration_curve(tiny_features.y, proba, n_bins=10, strategy="uniform")
    assert curve["observed_rate"] == pytest.approx(prob_true) and curve["mean_predicted"] == pytest.approx(prob_pred)
    assert curve["count"].sum() == len(proba) and (curve["count"] > 0).all()
    assert ((curve["bin_low"] <= curve["mean_predicted"]) & (curve["mean_predicted"] <= curve["bin_high"])).all()


def test_a_subgroup_mostly_outside_training_gets_the_shift_warning():
    metrics = {"test": {"n": 30, "outside_training": 0.3 * 0.9, "subgroups": {"source": {
        "hbfmid": {"n": 9, "outside_training": 0.9}, "fracatlas": {"n": 21, "outside_training": 0.0}}}}}
    (split_warning, source_warning) = shift_alarms(metrics)
    assert "27% of the images of split 'test' do not" in split_warning
    assert "90% of the images of split 'test', source 'hbfmid' do not look like" in source_warning
    noise = {"all": {"n": 30, "outside_training": 0.04, "subgroups": {"region": {
        "hip": {"n": 2, "outside_training": 0.5}, "leg": {"n": 28, "outside_training": 1 / 28}}}}}
    assert shift_alarms(noise) == []  # 1 image of 2: within what the training source's own images show
    noise["all"]["subgroups"]["region"]["leg"]["outside_training"] = 0.5  # 14 of 28 is not chance
    (warning,) = shift_alarms(noise)
    assert warning.startswith("50% of the images of region 'leg' do not look like")
    one_source = {"all": {"n": 9, "outside_training": 0.9, "subgroups": {"source": {"hbfmid": {"n": 9, "outside_training": 0.9}}}}}
    assert len(shift_alarms(one_source)) == 1  # a subgroup that is the whole split is not warned of twice


def test_the_cli_prints_the_per_subgroup_tables(fitted, two_sources, tmp_path, python, subprocess_env):
    import subprocess

    model = fitted.save(tmp_path / "m.joblib")
    r = subprocess.run([python, "-m", "fracfeat", "evaluate", str(model), str(two_sources),
                        "--by", "source,region,projection"], env=subprocess_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "per projection, every image (95% group-bootstrap intervals)" in lines
    assert lines[0].split() == ["metric", "all"]
    at = lines.index("per source, every image (95% group-bootstrap intervals)")
    assert lines[at + 1].split() == ["source", "n", "positives", "roc_auc", "sensitivity", "specificity", "brier",
                                     "outside_training"]
    assert lines[at + 2].split()[:3] == ["fracatlas", "16", "8"] and lines[at + 3].split()[:3] == ["hbfmid", "9", "6"]
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", lines[at + 2])  # ROC AUC [low, high]
    hip = next(line for line in lines if line.startswith("hip "))
    assert hip.split()[1:4] == ["2", "2", "n/a"]  # one class: no ROC AUC, the counts shown
