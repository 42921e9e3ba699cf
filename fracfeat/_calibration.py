"""Probabilities for a classifier that only ranks (the RBF SVM), increasing in its decision function.

libsvm's own Platt scaling (``SVC(probability=True)``, deprecated in scikit-learn 1.9 and removed in 1.11)
fits its sigmoid by an internal cross-validation whose slope may come out with either sign: on 120
FracAtlas radiographs it came out inverted (CV ROC AUC 0.84 on the decision function, 0.11 held out on
the probabilities). :class:`SigmoidCalibrated` fits Platt's sigmoid on out-of-fold decision values with
the slope held positive, so P(fractured) ranks images exactly as the decision function does, whatever
the data; when the out-of-fold values carry no ranking the slope goes to its floor and every probability
sits near the base rate instead of turning the ranking upside down.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.utils import get_tags
from sklearn.utils.validation import check_is_fitted

# The slope's floor on standardized decision values: positive (the sigmoid always increases) and small
# enough that uninformative decision values give probabilities flat at the base rate.
MIN_SLOPE = 1e-6


def fit_increasing_sigmoid(decision: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(slope > 0, intercept) of P(positive) = 1 / (1 + exp(-(slope * decision + intercept))).

    Platt's (1999) fit: maximum likelihood on targets smoothed towards 1/2 by the class counts, which keeps
    small sets from getting a sigmoid as steep as a step; the slope is bounded below by a positive floor.
    """
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    d = np.asarray(decision, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    target = np.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    center, spread = float(d.mean()), float(d.std()) or 1.0
    z = (d - center) / spread

    def loss(params):
        a, b = params
        t = a * z + b
        p = expit(t)
        value = -(target * log_expit(t) + (1.0 - target) * log_expit(-t)).sum()
        residual = p - target
        return value, np.array([(residual * z).sum(), residual.sum()])

    prior = np.log((n_pos + 1.0) / (n_neg + 1.0))
    found = minimize(loss, x0=np.array([1.0, prior]), jac=True, method="L-BFGS-B",
                     bounds=[(MIN_SLOPE, None), (None, None)])
    a, b = (float(v) for v in found.x)
    return a / spread, b - a * center / spread


class SigmoidCalibrated(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """A binary classifier with ``decision_function``, given probabilities increasing in it.

    ``fit`` trains ``estimator`` on all rows, and fits an increasing sigmoid (Platt scaling with the
    slope held positive) on decision values that ``cv`` stratified folds predict out of fold. So
    ``predict_proba(X)[:, 1]`` ranks rows exactly as ``decision_function(X)`` does, and ROC AUC is the
    same on either.

    Parameters
    ----------
    estimator : classifier with ``decision_function``
        E.g. ``sklearn.svm.SVC(kernel="rbf")``.
    cv : int
        Stratified folds for the out-of-fold decision values (fewer when a class has fewer images).
    random_state : int, optional
        Shuffles the folds.

    Attributes
    ----------
    estimator_ : the estimator fitted on every row
    slope_, intercept_ : float
        P(classes_[1]) = 1 / (1 + exp(-(slope_ * decision + intercept_))); ``slope_ > 0``.
    classes_ : ndarray of shape (2,)

    Examples
    --------
    >>> from sklearn.svm import SVC
    >>> model = SigmoidCalibrated(SVC(C=1.0), cv=5, random_state=0).fit(X, y)   # doctest: +SKIP
    >>> model.predict_proba(X_new)[:, 1]                                         # doctest: +SKIP
    """

    def __init__(self, estimator, cv: int = 5, random_state=None):
        self.estimator = estimator
        self.cv = cv
        self.random_state = random_state

    def fit(self, X, y):
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import column_or_1d

        if y is None:
            raise ValueError("SigmoidCalibrated requires y to be passed, but the target y is None")
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) != 2:
            raise ValueError(f"Only binary classification is supported by SigmoidCalibrated; y holds "
                             f"{len(self.classes_)} classes")
        positive = y == self.classes_[1]
        n_splits = min(int(self.cv), int(positive.sum()), int((~positive).sum()))
        if n_splits < 2:
            raise ValueError(f"calibrating probabilities needs at least 2 rows of each class in y "
                             f"(it has {int(positive.sum())} of {self.classes_[1]!r}, "
                             f"{int((~positive).sum())} of {self.classes_[0]!r})")
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        out_of_fold = cross_val_predict(clone(self.estimator), X, y, cv=folds, method="decision_function")
        self.slope_, self.intercept_ = fit_increasing_sigmoid(out_of_fold, positive)
        self.estimator_ = clone(self.estimator).fit(X, y)
        if hasattr(self.estimator_, "n_features_in_"):
            self.n_features_in_ = self.estimator_.n_features_in_
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.estimator_.decision_function(X)

    def predict_proba(self, X) -> np.ndarray:
        from scipy.special import expit

        check_is_fitted(self)
        p = expit(self.slope_ * np.asarray(self.decision_function(X), dtype=np.float64) + self.intercept_)
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # Platt's sigmoid is binary
        tags.input_tags.sparse = get_tags(self.estimator).input_tags.sparse
        return tags
