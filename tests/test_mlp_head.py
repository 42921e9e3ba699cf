"""The dense head (the recipes' frozen base + new dense layers) as the "mlp" classifier family: tuned by
Optuna on stored features, one of "auto"'s families, saved in the same Pipeline."""

from __future__ import annotations

import numpy as np
import optuna
from sklearn.neural_network import MLPClassifier

from fracfeat import fit, load_model
from fracfeat._classifiers import FAMILIES, SearchContext, suggest_steps


def test_mlp_is_a_family_of_auto():
    assert "mlp" in FAMILIES
    trial = optuna.trial.FixedTrial({"classifier": "mlp", "mlp_pca_variance": 0.95, "mlp_units": 64, "mlp_layers": 2,
                                     "mlp_alpha": 1e-3, "mlp_learning_rate": 1e-3})
    family, steps = suggest_steps(trial, "auto", SearchContext(seed=3))
    clf = dict(steps)["classifier"]
    assert family == "mlp" and isinstance(clf, MLPClassifier)
    assert (clf.hidden_layer_sizes, clf.alpha, clf.random_state) == ((64, 16), 1e-3, 3)


def test_the_dense_head_is_tuned_saved_and_predicts_the_same(tiny_features, tmp_path):
    result = fit(tiny_features, classifier="mlp", n_trials=3, cv=3)
    assert result.classifier == "mlp" and result.trials["complete"] == 3
    assert {"mlp_units", "mlp_layers", "mlp_alpha", "mlp_learning_rate"} <= set(result.best_params)
    assert isinstance(result.pipeline[-1], MLPClassifier) or isinstance(
        getattr(result.pipeline[-1], "estimator", None), MLPClassifier)
    loaded = load_model(result.save(tmp_path / "mlp.joblib"))
    X = tiny_features.X
    np.testing.assert_allclose(loaded[1:].predict_proba(X), result.pipeline[1:].predict_proba(X))
    assert 0.0 <= result.cv_score <= 1.0


def test_the_external_benchmark_trains_its_mlp_row_with_the_dense_head(tiny_features):
    """benchmarks/external.py's "mlp" method fits classifier="mlp" whatever the run's --classifier says."""
    import argparse
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("external_benchmark", REPO / "benchmarks" / "external.py")
    external = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = external  # its dataclasses look their module up there
    spec.loader.exec_module(external)
    method = external.METHODS["mlp"]
    assert external.missing_option(method) is None
    args = argparse.Namespace(classifier="svm", trials=2, seed=0)
    result, _ = external.trained(tiny_features, method, args)
    head = result.pipeline[-1]
    assert result.classifier == "mlp"
    assert isinstance(head, MLPClassifier) or isinstance(getattr(head, "estimator", None), MLPClassifier)
    assert external.missing_option(external.Method("a head fracfeat lacks", fit={"classifier": "forest"}))
