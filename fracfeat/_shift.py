"""The shift alarm: does an image look like the images a model was trained on?

A model trained at one hospital can rank another hospital's radiographs worse than chance while its
probabilities look as confident as ever. :class:`OutsideTraining` is kept in every Pipeline that
:func:`fracfeat.fit` makes (``pipeline.outside_training_``) and flags images whose features lie outside
the training images': ``predict`` marks them (``outside_training``), ``evaluate`` reports the share per
split, and the report warns that figures on such images mean little.

The score is the mean cosine distance of an image's features, standardized on the training rows, to
its ``n_neighbors`` nearest training images. The threshold is the ``quantile`` of the scores of the
training images themselves, each scored out of fold (by a detector that never saw its group of
near-duplicates), so about ``1 - quantile`` of new images from the training source are flagged.

Measured (research for issue 15, VGG16 224 px average-pooled features, detectors compared on equal
terms before any was chosen): trained on all of FracAtlas, this flags 91% of HBFMID's web-collected
radiographs and 4.2% of held-out FracAtlas images (grouped 5-fold), the best of seven detectors tried
(Mahalanobis on PCA or Ledoit-Wolf covariance, PCA residual, Euclidean kNN, isolation forest). A
body region FracAtlas never saw is flagged 37-64% of the time: a shift within one hospital is subtler.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.model_selection import GroupKFold, KFold
from sklearn.utils.validation import check_is_fitted

from ._errors import ConfigError


class OutsideTraining(BaseEstimator):
    """Flags feature rows unlike the training rows: mean cosine distance to the k nearest, over a threshold.

    Parameters
    ----------
    n_neighbors : int
        Training images the distance is averaged over.
    quantile : float
        Share of the training source's own images (scored out of fold) below the threshold.
    cv : int
        Folds for the out-of-fold scores (grouped when ``fit`` gets groups).

    Attributes
    ----------
    threshold_ : float
        Scores above it are flagged.
    train_flagged_ : float
        Share of the training images flagged out of fold (about ``1 - quantile``).
    """

    def __init__(self, n_neighbors=10, quantile=0.95, cv=5):
        self.n_neighbors = n_neighbors
        self.quantile = quantile
        self.cv = cv

    def fit(self, X, y=None, groups=None):
        """Keep the training rows (standardized, unit length) and calibrate the threshold out of fold."""
        X = np.asarray(X, dtype=np.float64)
        if not 0 < self.quantile < 1:
            raise ConfigError(f"quantile={self.quantile!r}: give a share between 0 and 1, e.g. 0.95")
        if len(X) < 2 * self.cv or len(X) <= self.n_neighbors:
            raise ConfigError(f"the shift alarm needs more than {max(2 * self.cv, self.n_neighbors)} training images "
                              f"(got {len(X)})")
        oof = np.empty(len(X))
        splitter = GroupKFold(self.cv) if groups is not None and len(set(groups)) >= self.cv else KFold(
            self.cv, shuffle=True, random_state=0)
        for train, held in splitter.split(X, groups=groups):
            oof[held] = self._fitted_on(X[train])._scores(X[held])
        fitted = self._fitted_on(X)
        self.mean_, self.scale_, self.reference_ = fitted.mean_, fitted.scale_, fitted.reference_
        self.threshold_ = float(np.quantile(oof, self.quantile))
        self.train_flagged_ = float(np.mean(oof > self.threshold_))
        return self

    def _fitted_on(self, X: np.ndarray) -> "OutsideTraining":
        part = OutsideTraining(self.n_neighbors, self.quantile, self.cv)
        part.mean_ = X.mean(axis=0).astype(np.float32)
        std = X.std(axis=0)
        part.scale_ = np.where(std > 0, std, 1.0).astype(np.float32)
        # float16 directions: half the model file (3.3 MB for 3,267 images x 512 features), cosine
        # similarities within 1e-3 of float32's, far below the threshold's own spread.
        part.reference_ = part._directions(X).astype(np.float16)
        return part

    def _directions(self, X: np.ndarray) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_
        norms = np.linalg.norm(Z, axis=1, keepdims=True)
        return Z / np.where(norms > 0, norms, 1.0)

    def _scores(self, X: np.ndarray) -> np.ndarray:
        k = min(self.n_neighbors, len(self.reference_))
        reference = self.reference_.astype(np.float32)
        out = np.empty(len(X))
        for start in range(0, len(X), 512):  # bounded memory: 512 x n_train similarities at a time
            sims = self._directions(X[start:start + 512]).astype(np.float32) @ reference.T
            nearest = -np.partition(-sims, k - 1, axis=1)[:, :k]
            out[start:start + 512] = 1.0 - nearest.mean(axis=1)
        return out

    def score_samples(self, X) -> np.ndarray:
        """Mean cosine distance to the nearest training images: larger is less like them."""
        check_is_fitted(self, "threshold_")
        return self._scores(np.asarray(X))

    def predict(self, X) -> np.ndarray:
        """True for rows outside the training images' distribution."""
        return self.score_samples(X) > self.threshold_
