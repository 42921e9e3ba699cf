"""The shift alarm: a model says when images do not look like its training images (issue 15, part 1)."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from conftest import FRACATLAS, REPO, SHARED, TINY, manifest_rows
from fracfeat import ConfigError, evaluate, extract, fit, load_model, predict
from fracfeat._metrics import SHIFT_WARNING, shift_alarms
from fracfeat._shift import OutsideTraining

HBFMID = SHARED / "data" / "hbfmid"


def _one_per_group(rows):
    seen = {}
    for r in rows:
        seen.setdefault(r["group"], r)
    return list(seen.values())


@pytest.fixture(scope="module")
def hbfmid_rows():
    if not (HBFMID / "manifest.csv").is_file():
        pytest.skip(f"HBFMID not found at {HBFMID} (set FRACFEAT_SHARED to the shared/ folder)")
    with open(HBFMID / "manifest.csv", newline="") as f:
        return _one_per_group(list(csv.DictReader(f)))


@pytest.mark.slow
def test_the_alarm_flags_another_source_far_more_than_the_training_source(tmp_path, vgg16_weights, fracatlas,
                                                                         hbfmid_rows):
    # Real VGG16 features at 224 px, float32 on every machine. 100 FracAtlas groups train the alarm; 40 other
    # FracAtlas groups and 40 HBFMID groups (web-collected, other scanners and framing) are scored.
    rows = _one_per_group([r for r in manifest_rows() if r["use"] == "1"])
    settings = dict(weights=vgg16_weights, image_size=224, precision="float32", store=tmp_path / "s", progress=False)
    train = extract([fracatlas / r["path"] for r in rows[:100]], groups=[r["group"] for r in rows[:100]], **settings)
    same = extract([fracatlas / r["path"] for r in rows[100:140]], **settings)
    other = extract([HBFMID / r["path"] for r in hbfmid_rows[:40]], **settings)
    alarm = OutsideTraining().fit(train.X, groups=train.groups)
    assert alarm.train_flagged_ == pytest.approx(0.05, abs=0.02)  # the calibration: 1 - quantile, out of fold
    same_share, other_share = alarm.predict(same.X).mean(), alarm.predict(other.X).mean()
    # Measured at this size: 0.125 and 0.45. On all of FracAtlas (3,267 training images) it flags 3.6% of the
    # held-out FracAtlas images and 88% of HBFMID (README, "Another hospital").
    assert same_share <= 0.2 and other_share >= 0.3 and other_share > 2 * same_share


def test_fit_keeps_an_alarm_that_predict_and_evaluate_report(tiny_features, tmp_path):
    result = fit(tiny_features, classifier="logreg", n_trials=2, cv=3, progress=False)
    alarm = result.pipeline.outside_training_
    assert isinstance(alarm, OutsideTraining) and alarm.threshold_ > 0
    path = result.save(tmp_path / "m.joblib")
    loaded = load_model(path)
    paths = [str(p) for p in tiny_features.paths[:4]]
    rows = predict(loaded, paths)
    assert [r["path"] for r in rows] == paths and all(isinstance(r["outside_training"], bool) for r in rows)
    expected = loaded.outside_training_.predict(loaded[0].transform(paths))
    assert [r["outside_training"] for r in rows] == expected.tolist()
    metrics = evaluate(loaded, tiny_features)
    share = metrics["all"]["outside_training"]
    assert 0.0 <= share <= 1.0
    assert share == pytest.approx(loaded.outside_training_.predict(tiny_features.X).mean())


def test_models_saved_before_the_alarm_predict_without_one():
    saved = REPO / "tests" / "data" / "models" / "fracfeat-0.2.0-joined-svm.joblib"
    model = load_model(saved)
    image = str(REPO / "examples" / "data" / "fracatlas-sample" / "fractured" / "IMG0000044.jpg")
    (row,) = predict(model, [image])
    assert row["outside_training"] is None and row["label"] in ("fractured", "not_fractured")


def test_a_split_with_many_images_outside_training_gets_a_plain_warning():
    metrics = {"test": {"outside_training": 0.6}, "val": {"outside_training": SHIFT_WARNING / 2}, "all": {}}
    (warning,) = shift_alarms(metrics)
    assert "60% of the images of split 'test' do not look like the model's training images" in warning
    assert "mean little" in warning


def test_too_few_training_images_for_an_alarm_is_a_clear_error_and_fit_goes_on(tiny_features, caplog):
    with pytest.raises(ConfigError, match="needs more than 10 training images"):
        OutsideTraining().fit(np.zeros((8, 4)))
    with pytest.raises(ConfigError, match="quantile"):
        OutsideTraining(quantile=1.5).fit(np.random.default_rng(0).normal(size=(40, 4)))
    few = tiny_features.subset(np.r_[0:5, 24:29])
    with caplog.at_level(logging.INFO, logger="fracfeat"):
        result = fit(few, classifier="logreg", n_trials=1, cv=2, progress=False)
    assert result.pipeline.outside_training_ is None and "no shift alarm" in caplog.text
