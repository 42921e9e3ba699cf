"""Model files saved by earlier fracfeat versions keep loading and predicting as they did.

tests/data/models/ holds a small model saved by each earlier version (see each file's .json: what made
it and its predictions on radiographs of the shipped sample, examples/data/fracatlas-sample).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fracfeat import load_model, predict

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "tests" / "data" / "models"
SAVED = sorted(MODELS.glob("*.joblib"))


@pytest.mark.parametrize("saved", SAVED, ids=lambda p: p.name)
def test_a_model_saved_by_an_earlier_version_predicts_as_it_did(saved, caplog):
    expected = json.loads(saved.with_name(saved.name + ".json").read_text())
    with caplog.at_level(logging.WARNING, logger="fracfeat"):
        model = load_model(saved)
    paths = [str(REPO / p) for p in expected["paths"]]
    np.testing.assert_allclose(model.predict_proba(paths)[:, 1], expected["proba"], atol=1e-4)
    assert model.predict(paths).tolist() == expected["pred"]
    if "outside_training" in expected:  # saved with a shift alarm (0.3 on): it still flags as it did
        assert [int(r["outside_training"]) for r in predict(model, paths)] == expected["outside_training"]


def test_an_inverted_svm_of_fracfeat_0_1_is_named_when_loaded(caplog):
    # This model is a real case of the bug: its libsvm probabilities rank its own training images inversely.
    with caplog.at_level(logging.WARNING, logger="fracfeat"):
        load_model(MODELS / "fracfeat-0.1.0-svm.joblib")
    assert "saved by fracfeat 0.1" in caplog.text and "INVERTED" in caplog.text and "Fit it again" in caplog.text


def test_a_model_fitted_now_loads_without_a_warning(tiny_features, tmp_path, caplog):
    from fracfeat import fit

    path = fit(tiny_features, classifier="svm", n_trials=2, cv=3).save(tmp_path / "m.joblib")
    with caplog.at_level(logging.WARNING, logger="fracfeat"):
        load_model(path)
    assert caplog.text == ""
