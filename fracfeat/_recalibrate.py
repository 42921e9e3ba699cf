"""recalibrate(): a model's probabilities and threshold refitted on a few labeled images of a new site.

Measured in the research for issue 15 (benchmarks/research_issue15/REPORT.md, 200 draws per setting):
48 labeled HBFMID images recalibrate a FracAtlas-trained model's probabilities (Brier 0.53 -> 0.04) but
cannot repair its ranking; a threshold re-picked on so few labels swings from draw to draw (sensitivity
0.1-0.95 between the 2.5th and 97.5th percentiles), while a class-balanced Platt fit cut at 0.5 is about
half as wide; and the Platt slope came out negative in 34-50% of the HBFMID draws, which is the model
saying it does not rank the site's images. So :func:`recalibrate` fits the probabilities (Platt or
isotonic) on the model's log-odds, takes the threshold from the balanced Platt fit, and refuses a model
whose slope is not clearly positive.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ._adapt import ids_digest, image_model_parts, now_utc, site_rows
from ._errors import ConfigError, ModelError
from ._model_io import pipeline_of
from ._validation import bootstrap_ci

log = logging.getLogger("fracfeat")

METHODS = ("platt", "isotonic")
EPS = 1e-12  # probabilities are clipped to [EPS, 1 - EPS] before their log-odds are taken


def log_odds(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_sigmoid(z, y, balanced: bool = False) -> tuple[float, float]:
    """(slope, intercept) of P(y = 1) = 1 / (1 + exp(-(slope * z + intercept))), either sign of slope.

    Platt's targets (smoothed towards 1/2 by the class counts, so a separable set gives a finite slope),
    Newton's method on the mean log loss; ``balanced`` weighs each class to half the total.
    """
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    target = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    weight = np.where(y, 0.5 / max(n_pos, 1), 0.5 / max(n_neg, 1)) if balanced else np.full(len(z), 1.0 / len(z))
    center, spread = float(z.mean()), float(z.std()) or 1.0
    design = np.column_stack([(z - center) / spread, np.ones(len(z))])
    params = np.zeros(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(design @ params)))
        gradient = design.T @ (weight * (p - target))
        hessian = (design * (weight * p * (1.0 - p))[:, None]).T @ design + 1e-10 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        params -= step
        if np.abs(step).max() < 1e-10:
            break
    a, b = params
    return float(a / spread), float(b - a * center / spread)


class LocalCalibration(ClassifierMixin, BaseEstimator):
    """A fitted classifier's P(fractured) mapped through a calibration fitted on a site's labeled images.

    Parameters
    ----------
    estimator : fitted classifier with ``predict_proba``
        The model's own final step (kept as it is; never refitted).
    method : {"platt", "isotonic"}

    Attributes
    ----------
    slope_, intercept_ : float
        Platt's sigmoid on the estimator's log-odds (also kept for ``method="isotonic"``).
    isotonic_ : IsotonicRegression or None
    classes_ : ndarray of shape (2,)
    """

    def __init__(self, estimator=None, method: str = "platt"):
        self.estimator = estimator
        self.method = method

    def fit(self, X, y):
        """Fit the calibration on the estimator's log-odds of ``X`` (the estimator itself is not refitted)."""
        return self.fit_scores(log_odds(self.estimator.predict_proba(X)[:, 1]), y)

    def fit_scores(self, z, y):
        """Fit the calibration on log-odds ``z`` the estimator already gave."""
        from sklearn.isotonic import IsotonicRegression

        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        y = np.asarray(y)
        self.classes_ = np.asarray(getattr(self.estimator, "classes_", np.array([0, 1])))
        self.slope_, self.intercept_ = fit_sigmoid(z, y)
        self.isotonic_ = (IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(z, y == 1)
                          if self.method == "isotonic" else None)
        return self

    def calibrated(self, z) -> np.ndarray:
        """P(fractured) of log-odds ``z`` of the estimator."""
        check_is_fitted(self, "slope_")
        z = np.asarray(z, dtype=np.float64)
        if self.isotonic_ is not None:
            return np.asarray(self.isotonic_.predict(z), dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-(self.slope_ * z + self.intercept_)))

    def predict_proba(self, X) -> np.ndarray:
        p = self.calibrated(log_odds(self.estimator.predict_proba(X)[:, 1]))
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]


def recalibrate(model, images, *, method: str = "platt", min_labels: int = 50, min_per_class: int = 10,
                force: bool = False, n_boot: int = 1000, seed: int = 0, version="latest"):
    """A copy of ``model`` whose probabilities and threshold are refitted on labeled images of a new site.

    On the model's log-odds of the labeled images it fits Platt's sigmoid (or isotonic regression) for
    the probabilities, and a class-balanced Platt fit whose 0.5 crossing becomes the decision threshold
    (a FixedThresholdClassifier, as :func:`fracfeat.fit` keeps one). The ranking is the model's own: no
    recalibration can repair a model that does not rank the site's images, so a Platt slope at or below
    0, or a bootstrap interval of it that reaches 0, is refused unless ``force``.

    Parameters
    ----------
    model : Pipeline, FitResult, or path of a saved model
        From :func:`fracfeat.fit` (adapted by :func:`fracfeat.adapt` or not); a model recalibrated before
        has its calibration replaced, not stacked.
    images : labeled image source, FeatureSet, FeatureStore or store directory
        Class folders or a CSV with labels (groups, when given, keep near-duplicates together in the
        bootstrap and the folds), or labeled rows of the model's extractor.
    method : {"platt", "isotonic"}
        The probabilities' map; the threshold comes from the balanced Platt fit either way.
    min_labels, min_per_class : int
        Fewer labeled images, or fewer of either class, are refused.
    force : bool
        Return the model even when the slope says the model does not rank these images.
    n_boot : int
        Bootstrap resamples (of groups when the images have them, within each class).
    seed : int
    version : int or "latest"
        Store version, when ``images`` is a store.

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``recalibrated.recalibrated_to_`` holds what a user needs to judge it: ``slope`` with ``slope_low`` /
        ``slope_high``, ``threshold`` with its bootstrap range, the local ``roc_auc``, and ``sensitivity`` /
        ``specificity`` at the new threshold estimated out of fold (each ``{"value", "low", "high"}``),
        ``brier_before`` / ``brier_after`` on the labeled images, counts, ``ids_sha256``, ``date``.

    Raises
    ------
    fracfeat.ModelError
        The model does not rank these images (slope <= 0 or its interval reaches 0), without ``force``.
    fracfeat.ConfigError
        Too few labels, or a model that does not read images.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    pipeline = copy.deepcopy(pipeline_of(model))
    deep, head = image_model_parts(pipeline, "recalibrate")
    rows = site_rows(deep, images, version=version, labeled=True)
    y = np.asarray(rows.y)
    _check_counts(y, min_labels, min_per_class)
    base = _uncalibrated(head.steps[-1][1])
    z = log_odds(base.predict_proba(head[:-1].transform(rows.X))[:, 1])
    calibration = LocalCalibration(base, method).fit_scores(z, y)
    threshold = _threshold(calibration, z, y)
    found = _trust(calibration, z, y, rows.groups, method, n_boot, seed)
    found.update(method=method, threshold=threshold, n_labels=int(len(y)), n_positive=int((y == 1).sum()),
                 n_negative=int((y == 0).sum()), n_failed=int(rows.n_failed), source=rows.description,
                 grouped=rows.groups is not None, ids_sha256=ids_digest(rows.ids), date=now_utc(),
                 intercept=calibration.intercept_,
                 brier_before=float(np.mean((1.0 / (1.0 + np.exp(-z)) - y) ** 2)),
                 brier_after=float(np.mean((calibration.calibrated(z) - y) ** 2)))
    if found["slope"] <= 0 or found["slope_low"] <= 0:  # at or below 0, or an interval that reaches it
        message = _not_ranking(found)
        if not force:
            raise ModelError(message + "; not recalibrated: pass force=True (--force) to keep it anyway")
        log.warning("%s (kept: force=True)", message)
    return _with_calibration(pipeline, calibration, threshold, found)


def _check_counts(y: np.ndarray, min_labels: int, min_per_class: int) -> None:
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if len(y) < min_labels or min(n_pos, n_neg) < min_per_class:
        raise ConfigError(f"only {len(y)} labeled images ({n_pos} fractured, {n_neg} not fractured): recalibrating "
                          f"needs at least {min_labels}, with {min_per_class} of each class, or its slope and "
                          f"threshold are noise; label more images of the site")


def _uncalibrated(final):
    """The model's own final step: the one inside an earlier recalibration, so a second one replaces it."""
    inner = getattr(final, "estimator_", None)
    return inner.estimator if isinstance(inner, LocalCalibration) else final


def _balanced_cut(z, y) -> float:
    """The log-odds where the class-balanced Platt fit crosses 0.5."""
    a, b = fit_sigmoid(z, y, balanced=True)
    return -b / a if a != 0 else float(np.median(z))


def _threshold(calibration: LocalCalibration, z, y) -> float:
    """The balanced Platt fit's 0.5 crossing, on the scale of the calibrated probabilities."""
    return float(calibration.calibrated([_balanced_cut(z, y)])[0])


def group_resamples(y, groups, n: int, seed: int):
    """Bootstrap index sets: groups (or images, without groups) drawn with replacement within each class."""
    rng = np.random.default_rng(seed)
    keys = np.asarray(groups).astype(str) if groups is not None else np.arange(len(y)).astype(str)
    _, inverse = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    by_class = [[m for m in members if y[m[0]] == c] for c in (0, 1)]
    for _ in range(n):
        yield np.concatenate([m for part in by_class for m in (part[i] for i in rng.integers(0, len(part), len(part)))])


def _out_of_fold(method: str, z, y, groups, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated P, decision at the balanced threshold) of each image, fitted on the other folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    smallest = int(min((y == 1).sum(), (y == 0).sum()))
    if groups is not None:
        smallest = min(smallest, *(len(set(np.asarray(groups)[y == c])) for c in (0, 1)))
    k = max(2, min(5, smallest))
    splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if groups is not None
                else StratifiedKFold(k, shuffle=True, random_state=seed))
    proba, pred = np.empty(len(y)), np.zeros(len(y), dtype=int)
    for train, held in splitter.split(z, y, groups):
        if len(np.unique(y[train])) < 2:
            proba[held], pred[held] = np.mean(y[train]), int(np.mean(y[train]) >= 0.5)
            continue
        fold = LocalCalibration(None, method).fit_scores(z[train], y[train])
        proba[held] = fold.calibrated(z[held])
        pred[held] = (z[held] >= _balanced_cut(z[train], y[train])).astype(int)
    return proba, pred


def _trust(calibration, z, y, groups, method: str, n_boot: int, seed: int) -> dict:
    """Slope and threshold with bootstrap intervals; local ROC AUC and out-of-fold sensitivity/specificity."""
    slopes, cuts = [], []
    for idx in group_resamples(y, groups, n_boot, seed):
        slopes.append(fit_sigmoid(z[idx], y[idx])[0])
        cuts.append(_balanced_cut(z[idx], y[idx]))
    low, high = (float(v) for v in np.percentile(slopes, [2.5, 97.5]))
    thresholds = calibration.calibrated(np.asarray(cuts))
    proba, pred = _out_of_fold(method, z, y, groups, seed)
    ci = bootstrap_ci(y, z, pred, groups, n_boot=n_boot, seed=seed)
    return {"slope": calibration.slope_, "slope_low": low, "slope_high": high,
            "threshold_low": float(np.percentile(thresholds, 2.5)),
            "threshold_high": float(np.percentile(thresholds, 97.5)),
            "roc_auc": ci["roc_auc"], "sensitivity": ci["sensitivity"], "specificity": ci["specificity"],
            "brier_out_of_fold": float(np.mean((proba - y) ** 2)), "resampled": ci["resampled"],
            "n_boot": int(n_boot)}


def _not_ranking(found: dict) -> str:
    return (f"the model does not rank these images: Platt slope {found['slope']:+.3f} (95% interval "
            f"{found['slope_low']:+.3f} to {found['slope_high']:+.3f}, {found['n_labels']} labeled images); a slope "
            f"at or near 0 or below means the images it scores higher are not more often fractured, so no "
            f"recalibration makes its predictions useful here (local ROC AUC {found['roc_auc']['value']:.2f})")


def _with_calibration(pipeline, calibration: LocalCalibration, threshold: float, found: dict):
    """The Pipeline with its final step replaced by the threshold around the calibration (attributes kept)."""
    from sklearn.model_selection import FixedThresholdClassifier

    final = FixedThresholdClassifier(calibration, threshold=threshold, response_method="predict_proba")
    final.estimator_ = calibration  # already fitted: the model's classifier is never refitted on these labels
    name = pipeline.steps[-1][0]
    pipeline.steps[-1] = (name, final)
    pipeline.recalibrated_to_ = found
    return pipeline
