"""Probabilities rank images exactly as each family's decision function does, on small and large sets.

The bug this guards against: libsvm's internal Platt scaling (``SVC(probability=True)``) fitted its
sigmoid with the wrong sign on 120 FracAtlas radiographs, so every probability, the threshold and every
metric built on them came out inverted (decision function ROC AUC 0.996, probabilities 0.004).
"""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from scipy.stats import spearmanr
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from fracfeat._calibration import MIN_SLOPE, SigmoidCalibrated, fit_increasing_sigmoid
from fracfeat._classifiers import FAMILIES, SearchContext, suggest_steps

# One trial's parameters per family (as Optuna would suggest them), for the kept model.
PARAMS = {
    "logreg": {"logreg_pca_variance": 1.0, "logreg_C": 0.1, "logreg_class_weight": "balanced"},
    "svm": {"svm_pca_variance": 0.95, "svm_C": 3.0, "svm_gamma_scale": 1.0, "svm_class_weight": "balanced"},
    "xgboost": {"xgb_scale_pos_weight": "balanced", "xgb_n_estimators": 50, "xgb_max_depth": 3,
                "xgb_learning_rate": 0.1, "xgb_subsample": 0.8, "xgb_colsample_bytree": 0.8,
                "xgb_min_child_weight": 1.0, "xgb_reg_lambda": 1.0},
}


@parametrize_with_checks([SigmoidCalibrated(SVC(), cv=3, random_state=0)])
def test_sklearn_conformance(estimator, check):
    check(estimator)


def _kept_model(family: str, y) -> Pipeline:
    ctx = SearchContext(seed=0, n_positive=int((y == 1).sum()), n_negative=int((y == 0).sum()), final=True)
    return Pipeline(suggest_steps(optuna.trial.FixedTrial(PARAMS[family]), family, ctx)[1])


def _decision(model: Pipeline, X) -> np.ndarray:
    """The family's own ranking score: decision_function, or XGBoost's margin."""
    clf = model.steps[-1][1]
    Xt = model[:-1].transform(X)
    return clf.predict(Xt, output_margin=True) if not hasattr(clf, "decision_function") else clf.decision_function(Xt)


def _large_set():
    # 1,500 rows, 18% positive like FracAtlas, with label noise so the models are far from perfect.
    return make_classification(n_samples=1500, n_features=64, n_informative=8, weights=[0.82], flip_y=0.1,
                               random_state=0)


# The MLP head has no score of its own besides its probability (a logistic output unit), so it cannot
# invert one: the families with a decision value (or margin) separate from their probability are checked.
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mlp"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_probabilities_rank_rows_as_the_decision_function(family, size, tiny_features):
    if size == "small":
        X, y = np.asarray(tiny_features.X), np.asarray(tiny_features.y)  # 48 real radiographs
    else:
        X, y = _large_set()
    model = _kept_model(family, y).fit(X, y)
    proba, decision = model.predict_proba(X)[:, 1], _decision(model, X)
    order = np.argsort(decision, kind="stable")
    assert (np.diff(proba[order]) >= 0).all(), "P(fractured) decreases where the decision value increases"
    assert spearmanr(proba, decision).statistic == pytest.approx(1.0)
    assert roc_auc_score(y, proba) == pytest.approx(roc_auc_score(y, decision))


def test_the_svm_keeps_no_libsvm_probabilities():
    model = _kept_model("svm", np.array([0, 1]))
    clf = model.steps[-1][1]
    assert isinstance(clf, SigmoidCalibrated) and isinstance(clf.estimator, SVC)
    # Left at its default: "deprecated" in scikit-learn 1.9-1.10, gone after.
    assert clf.estimator.get_params().get("probability") in (None, "deprecated")


def test_the_sigmoid_never_turns_a_ranking_upside_down():
    # Decision values that rank the classes inversely: the slope stays at its positive floor, so the
    # probabilities keep the decision function's order and sit at the base rate.
    rng = np.random.default_rng(0)
    positive = rng.random(200) < 0.3
    decision = np.where(positive, -1.0, 1.0) + rng.normal(0, 0.3, 200)
    slope, intercept = fit_increasing_sigmoid(decision, positive)
    assert 0 < slope <= 10 * MIN_SLOPE / decision.std()
    p = 1 / (1 + np.exp(-(slope * decision + intercept)))
    assert np.ptp(p) < 1e-4 and abs(p.mean() - positive.mean()) < 0.02


def test_the_sigmoid_matches_the_data_when_it_ranks_well():
    rng = np.random.default_rng(1)
    positive = rng.random(500) < 0.2
    decision = np.where(positive, 1.0, -1.0) + rng.normal(0, 1.0, 500)
    slope, intercept = fit_increasing_sigmoid(decision, positive)
    p = 1 / (1 + np.exp(-(slope * decision + intercept)))
    assert slope > 0.5
    assert abs(p.mean() - positive.mean()) < 0.02  # calibrated on average


def test_too_few_rows_of_a_class_to_calibrate_is_a_clear_error():
    X = np.random.default_rng(0).normal(size=(10, 3))
    y = np.array([1] + [0] * 9)
    with pytest.raises(ValueError, match="at least 2 rows of each class"):
        SigmoidCalibrated(SVC(), cv=5).fit(X, y)
