"""adapt(): a fitted model re-standardized to a new site's images, without labels.

A model trained on FracAtlas ranks another source's radiographs (HBFMID) at about chance, and its kept
threshold calls nearly all of them fractured. The research for issue 15 (benchmarks/research_issue15/
REPORT.md) measured what an unlabeled sample of the new site can repair: mapping each feature's mean and
standard deviation over the site's images onto the training images' (``method="standardize"``) repairs
the operating point on held-out FracAtlas body regions (hip specificity 0.01 -> 0.59) as well as a
CORAL refit does, in seconds; it does not repair the ranking, and since the site's statistics carry its
fracture rate, a site with many more fractures than the training images loses sensitivity (97%-fractured
HBFMID: 0.88 -> 0.46). :func:`adapt` says so every time.

The training statistics come from the model itself, never from a second copy: the shift alarm's
(``pipeline.outside_training_.mean_`` and ``.scale_``: the training rows' per-feature mean and standard
deviation, kept by every model :func:`fracfeat.fit` made since 0.3), else the head's fitted
``StandardScaler`` (models saved before 0.3, whose scaler saw the same rows).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import logging
import os

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ._errors import ConfigError, ModelError, SourceError
from ._featureset import FeatureSet
from ._images import sha256_of_file
from ._metrics import alarm_of, split_feature_step
from ._model_io import pipeline_of
from ._sources import UNLABELED, load_records
from ._store import FeatureStore

log = logging.getLogger("fracfeat")

SITE_STEP = "site"  # the Pipeline step adapt inserts right after the image-reading feature step
METHODS = ("standardize",)
RATE_ASSUMPTION = (
    "adapt assumes the new images have about the same share of fractures as the training images: a site's "
    "feature means and spreads carry its fracture rate along with its scanner, so at a site with many more "
    "(or fewer) fractures the adapted model calls fewer (or more) images fractured than it should (measured: "
    "on 97%-fractured HBFMID, sensitivity fell 0.88 -> 0.46). It repairs the operating point, not the "
    "ranking: check the adapted model on labeled images of the site (fracfeat recalibrate) before relying on it.")


class SiteStandardizer(TransformerMixin, BaseEstimator):
    """Maps each feature's mean and standard deviation over a site's rows onto the training rows'.

    ``transform(X) = (X - mean_) / scale_ * train_scale + train_mean``: rows of the new site come out
    with the training rows' per-feature mean and spread, so the model's scaler and classifier see them
    on the scale they were fitted on.

    Parameters
    ----------
    train_mean, train_scale : array of shape (n_features,)
        The training rows' per-feature mean and standard deviation (from the model: see :func:`adapt`).

    Attributes
    ----------
    mean_, scale_ : ndarray of shape (n_features,)
        The site rows' per-feature mean and standard deviation (1 where a feature is constant).
    n_features_in_ : int
    """

    def __init__(self, train_mean=None, train_scale=None):
        self.train_mean = train_mean
        self.train_scale = train_scale

    def fit(self, X, y=None):
        """Keep the site rows' per-feature mean and standard deviation; ``y`` is ignored."""
        X = np.asarray(X, dtype=np.float64)
        if self.train_mean is None or self.train_scale is None:
            raise ConfigError("SiteStandardizer needs train_mean= and train_scale= (the training rows' statistics)")
        if X.ndim != 2 or X.shape[1] != len(self.train_mean):
            raise ConfigError(f"site rows have shape {X.shape}; the training statistics have "
                              f"{len(self.train_mean)} features")
        self.mean_ = X.mean(axis=0)
        std = X.std(axis=0)
        self.scale_ = np.where(std > 0, std, 1.0)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        """Site rows on the training rows' per-feature scale (float32, as the features are)."""
        check_is_fitted(self, "mean_")
        X = np.asarray(X, dtype=np.float64)
        out = (X - self.mean_) / self.scale_ * np.asarray(self.train_scale, np.float64)
        return (out + np.asarray(self.train_mean, np.float64)).astype(np.float32)


def adapt(model, images, *, method: str = "standardize", min_images: int = 100, version="latest"):
    """A copy of ``model`` adapted to a new site's images, without labels.

    A :class:`SiteStandardizer` fitted on the site's features is inserted right after the image-reading
    feature step (step ``"site"``); a model adapted before has its site step replaced, not stacked. The
    input model is not modified. Always warns that the adaptation assumes the site's fracture rate is
    like the training images'.

    Parameters
    ----------
    model : Pipeline, FitResult, or path of a saved model
        A model from :func:`fracfeat.fit` (it reads images and keeps its training statistics).
    images : image source, FeatureSet, FeatureStore or store directory
        The new site's images: a folder, CSV manifest or list of paths (labels are not used), or feature
        rows made by the model's own extractor (same fingerprint).
    method : {"standardize"}
        Per-feature re-standardization (the one measured to help; see the module's notes).
    min_images : int
        Fewer readable images than this are refused: their means and spreads are too noisy.
    version : int or "latest"
        Store version, when ``images`` is a store.

    Returns
    -------
    sklearn.pipeline.Pipeline
        The adapted model. ``adapted_.adapted_to_`` records ``n_images``, ``ids_sha256`` (a digest of the
        images' content hashes), ``date``, ``method``, ``statistics`` (where the training statistics came
        from), and ``outside_training_before`` / ``outside_training_after``: the share of the site's images
        the model's shift alarm flags on their own features and on the adapted ones (None without an alarm).
        The alarm itself is kept unchanged and still judges the images' own features in predict/evaluate.

    Examples
    --------
    >>> from fracfeat import adapt, save_model
    >>> adapted = adapt("model.joblib", "new_site/")                  # doctest: +SKIP
    >>> adapted.adapted_to_["outside_training_before"]                # doctest: +SKIP
    0.91
    >>> save_model(adapted, "model-new-site.joblib")                  # doctest: +SKIP
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if isinstance(min_images, bool) or not isinstance(min_images, (int, np.integer)) or min_images < 2:
        raise ConfigError(f"min_images={min_images!r}: give an integer of at least 2")
    pipeline = copy.deepcopy(pipeline_of(model))
    deep, head = image_model_parts(pipeline, "adapt")
    train_mean, train_scale, statistics = training_statistics(pipeline, head)
    rows = site_rows(deep, images, version=version)
    if len(rows.X) < min_images:
        raise ConfigError(f"only {len(rows.X)} of the {rows.n_given} images of {rows.description} could be read "
                          f"({rows.n_failed} failed): per-feature means and spreads of fewer than {min_images} "
                          f"images are too noisy to adapt a model to; give at least {min_images} images of the "
                          f"new site")
    site = SiteStandardizer(train_mean, train_scale).fit(rows.X)
    alarm = alarm_of(pipeline)
    shares = (None, None) if alarm is None else (float(np.mean(alarm.predict(rows.X))),
                                                 float(np.mean(alarm.predict(site.transform(rows.X)))))
    adapted = with_site_step(pipeline, deep, head, site)
    adapted.adapted_to_ = {
        "method": method, "n_images": int(len(rows.X)), "n_failed": int(rows.n_failed),
        "ids_sha256": ids_digest(rows.ids), "date": now_utc(), "source": rows.description,
        "statistics": statistics, "outside_training_before": shares[0], "outside_training_after": shares[1],
    }
    log.warning("%s", RATE_ASSUMPTION)
    if alarm is not None:
        log.info("shift alarm on the %d site images: %.0f%% flagged before adapting, %.0f%% after (the model "
                 "keeps the alarm, which judges the images' own features)", len(rows.X), 100 * shares[0],
                 100 * shares[1])
    return adapted


def image_model_parts(pipeline, what: str):
    """(the image-reading feature step, the rest of the Pipeline), or a ConfigError saying what ``what`` needs."""
    deep, head = split_feature_step(pipeline)
    if deep is None or not hasattr(head, "steps"):
        raise ConfigError(f"{what} needs a model from fracfeat.fit whose first step reads images (DeepFeatures); "
                          f"this {type(pipeline).__name__} takes feature arrays: fit it with fracfeat.fit on "
                          f"store features")
    return deep, head


def training_statistics(pipeline, head) -> tuple[np.ndarray, np.ndarray, str]:
    """(the training rows' per-feature mean, standard deviation, where they came from), read from the model."""
    from sklearn.preprocessing import StandardScaler

    alarm = alarm_of(pipeline)
    if alarm is not None and hasattr(alarm, "mean_"):
        return np.asarray(alarm.mean_, np.float64), np.asarray(alarm.scale_, np.float64), "shift alarm"
    scaler = dict(head.steps).get("scale")
    if isinstance(scaler, StandardScaler) and getattr(scaler, "scale_", None) is not None:
        return np.asarray(scaler.mean_, np.float64), np.asarray(scaler.scale_, np.float64), "StandardScaler"
    raise ConfigError("this model keeps no statistics of its training images: no shift alarm (it was saved "
                      "before fracfeat 0.3) and no fitted StandardScaler step; fit it again with this version "
                      "(fracfeat fit) to adapt it")


def with_site_step(pipeline, deep, head, site):
    """A new Pipeline: feature step, ``site``, then the head without any earlier site step; attributes kept."""
    from sklearn.pipeline import Pipeline

    rest = [(name, step) for name, step in head.steps if name != SITE_STEP]
    out = Pipeline([(pipeline.steps[0][0], deep), (SITE_STEP, site), *rest])
    for name, value in vars(pipeline).items():  # outside_training_, recalibrated_to_ and the like
        if name.endswith("_") and not name.startswith("_") and name != "adapted_to_":
            setattr(out, name, value)
    return out


class SiteRows:
    """Feature rows of a site's images, with what is known of them (labels, groups, content hashes)."""

    def __init__(self, X, ids, description, n_given, y=None, groups=None):
        self.X, self.ids, self.description, self.n_given = X, ids, description, int(n_given)
        self.y, self.groups = y, groups

    @property
    def n_failed(self) -> int:
        return self.n_given - len(self.X)


def site_rows(deep, images, *, version="latest", labeled: bool = False) -> SiteRows:
    """The model's features of ``images`` (a source, or rows of the same extractor), labeled rows only if asked."""
    data = images
    if isinstance(data, FeatureStore) or (isinstance(data, (str, os.PathLike)) and FeatureStore(data).exists()):
        data = (data if isinstance(data, FeatureStore) else FeatureStore(data)).open(version)
    if isinstance(data, FeatureSet):
        return _rows_of_feature_set(deep, data.labeled() if labeled else data)
    records, description = load_records(data)
    if labeled:
        records = [r for r in records if r.label != UNLABELED]
        if not records:
            raise SourceError(f"{description} holds no labeled images: give class folders or a CSV with labels")
    X, ok, failures = deep.features_of_paths([r.path for r in records], strict=False)
    if not len(ok):
        raise SourceError(f"none of the {len(records)} images of {description} could be read; first: "
                          f"{records[failures[0][0]].path}: {failures[0][1]}")
    kept = [records[i] for i in ok]
    groups = np.array([r.group for r in kept], dtype=object)
    return SiteRows(np.asarray(X, np.float32), [sha256_of_file(r.path) for r in kept], description, len(records),
                    y=np.array([r.label for r in kept]) if labeled else None,
                    groups=groups if all(groups) else None)


def _rows_of_feature_set(deep, fs: FeatureSet) -> SiteRows:
    if fs.fingerprint and fs.fingerprint != deep.fingerprint_:
        raise ConfigError(f"the features of {fs!r} were made by another extractor (fingerprint "
                          f"{fs.fingerprint[:12]}) than the model's ({deep.fingerprint_[:12]}): give the images "
                          f"themselves, or store features made with the model's settings")
    if not len(fs):
        raise ModelError(f"{fs!r} holds no rows to adapt or recalibrate on")
    groups = np.asarray(fs.groups, dtype=object)
    return SiteRows(np.asarray(fs.X, np.float32), list(fs.ids), repr(fs), len(fs) + len(fs.failures),
                    y=None if fs.y is None else np.asarray(fs.y), groups=groups if all(groups) else None)


def ids_digest(ids) -> str:
    """sha256 over the sorted content hashes: the same images give the same digest, in any order."""
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
