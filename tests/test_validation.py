"""Grouped out-of-fold evaluation and bootstrap intervals (fracfeat._validation)."""

from __future__ import annotations

import numpy as np
import pytest

from fracfeat import ConfigError
from fracfeat._validation import (
    bootstrap_ci,
    grouped_folds,
    out_of_fold,
    sensitivity_at_specificity,
    summary_metrics,
)


def test_grouped_folds_keep_groups_apart_and_cover_every_row(tiny_features):
    fs = tiny_features
    folds = grouped_folds(fs.y, fs.groups, n_splits=4, seed=0)
    held = np.concatenate([te for _, te in folds])
    assert sorted(held) == list(range(len(fs)))
    for tr, te in folds:
        assert not set(fs.groups[tr]) & set(fs.groups[te])
        assert set(fs.y[te]) == {0, 1}
    again = grouped_folds(fs.y, fs.groups, n_splits=4, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


def test_grouped_folds_refuse_missing_groups():
    with pytest.raises(ConfigError, match="group"):
        grouped_folds([0, 1, 0, 1], ["a", "", "b", "c"], n_splits=2)


def test_out_of_fold_trains_only_on_training_rows(tiny_features):
    from sklearn.linear_model import LogisticRegression

    fs = tiny_features
    folds = grouped_folds(fs.y, fs.groups, n_splits=4, seed=0)
    seen = []

    def fit_fold(train):
        seen.append(set(train.ids))
        return LogisticRegression(max_iter=500).fit(train.X, train.y), {"n": len(train)}

    oof = out_of_fold(fs, fit_fold, folds)
    for k, (tr, te) in enumerate(folds):
        assert seen[k] == set(fs.ids[tr]) and not seen[k] & set(fs.ids[te])
        assert (oof.fold[te] == k).all()
    assert oof.score.shape == (len(fs),) and ((oof.score >= 0) & (oof.score <= 1)).all()
    assert set(oof.pred) <= {0, 1} and [d["n"] for d in oof.details] == [len(tr) for tr, _ in folds]
    assert set(oof.metrics()) == {"roc_auc", "balanced_accuracy", "sensitivity", "specificity", "f1",
                                  "sensitivity_at_specificity"}


def test_out_of_fold_refuses_folds_that_leak_a_group(tiny_features):
    # A copy: the session's tiny_features must keep its groups (this test once changed them in place, and a
    # later tune-worker test on the same xdist worker found its rows differ from the store's).
    fs = tiny_features.subset(np.arange(len(tiny_features)))
    idx = np.arange(len(fs))
    leaky = [(idx[1:], idx[:1]), (idx[:1], idx[1:])]
    fs.groups[1] = fs.groups[0]
    with pytest.raises(ConfigError, match="both sides"):
        out_of_fold(fs, lambda train: None, leaky)
    assert tiny_features.groups[1] != tiny_features.groups[0]


def test_tests_leave_the_session_features_as_the_store_holds_them(tiny_features):
    """Every test sharing tiny_features must leave it as extracted: its rows are what the store's version holds."""
    from fracfeat import FeatureStore

    stored = FeatureStore(tiny_features.store).open(tiny_features.version)
    for name in ("ids", "y", "groups"):
        assert list(getattr(tiny_features, name)) == list(getattr(stored, name)), name


def test_summary_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.1, 0.05])
    pred = (score >= 0.5).astype(int)
    m = summary_metrics(y, score, pred)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["roc_auc"] == pytest.approx(14 / 15)  # only 0.3 < 0.7 is out of order
    # Specificity >= 0.85 allows no false positive: thresholds above 0.7 catch 2 of 3 fractures;
    # >= 0.8 allows one (0.7), and a threshold of 0.3 then catches all 3.
    assert sensitivity_at_specificity(y, score, 0.85) == pytest.approx(2 / 3)
    assert sensitivity_at_specificity(y, score, 0.8) == 1.0
    assert sensitivity_at_specificity(y, score, 0.0) == 1.0


def test_bootstrap_resamples_groups_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    # 60 groups of 3 copies scored alike, as a model scores near-duplicate radiographs.
    y = np.repeat(labels, 3)
    score = np.repeat(np.clip(labels * 0.3 + rng.normal(0.35, 0.2, 60), 0, 1), 3)
    pred = (score >= 0.5).astype(int)
    groups = np.repeat(np.arange(60), 3).astype(str)
    by_group = bootstrap_ci(y, score, pred, groups, n_boot=200, seed=0)
    by_image = bootstrap_ci(y, score, pred, None, n_boot=200, seed=0)
    assert by_group["resampled"] == "groups" and by_image["resampled"] == "images"
    for k in ("roc_auc", "sensitivity", "specificity"):
        assert by_group[k]["low"] <= by_group[k]["value"] <= by_group[k]["high"]
    # Copies are not independent evidence: the group interval is wider than the per-image one.
    width = lambda ci: ci["roc_auc"]["high"] - ci["roc_auc"]["low"]  # noqa: E731
    assert width(by_group) > width(by_image)
    assert bootstrap_ci(y, score, pred, groups, n_boot=200, seed=0) == by_group
