"""evaluate(): the metrics that matter on imbalanced radiographs, per split, under stable keys."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ._errors import ConfigError, SourceError, bad_rows_fix, check_finite_rows
from ._featureset import FeatureSet, classes_from_rows
from ._model_io import load_model, pipeline_of  # noqa: F401  (load_model: re-exported, its old home)
from ._sources import ROW_METADATA, UNLABELED, load_records
from ._store import FeatureStore

log = logging.getLogger("fracfeat")

# Keys of every per-split metrics dict, in this order; scripts may rely on them.
METRIC_KEYS = (
    "n", "n_positive", "n_negative", "n_failed",
    "accuracy", "balanced_accuracy", "precision", "recall", "sensitivity", "specificity", "f1",
    "roc_auc", "pr_auc", "brier", "ece", "cohen_kappa", "confusion_matrix", "classification_report", "outside_training",
)
# Keys evaluate adds after those, per split: intervals, the reliability curve, the subgroups' metrics.
DETAIL_KEYS = ("intervals", "reliability", "subgroups")


def _short(fingerprints) -> str:
    """Each part's fingerprint, its first 12 characters, joined by ``+``."""
    return "+".join(f[:12] for f in fingerprints)


def split_feature_step(model):
    """(the image-reading step, DeepFeatures or JoinedFeatures, or None; the part that takes feature arrays)."""
    from ._transformer import DeepFeatures, JoinedFeatures  # loads scikit-learn: not at `import fracfeat`

    steps = getattr(model, "steps", None)
    if steps and isinstance(steps[0][1], (DeepFeatures, JoinedFeatures)):
        return steps[0][1], model[1:]
    return None, model


def binary_metrics(y_true, y_pred, score, class_names=("not_fractured", "fractured")) -> dict:
    """Every metric of :data:`METRIC_KEYS` for one set of rows (1 = fractured is the positive class).

    Undefined values (ROC AUC of a one-class set, precision with no positive prediction) are None.
    ``confusion_matrix`` is ``[[tn, fp], [fn, tp]]``: rows are the true class (0, 1), columns the predicted.
    """
    from sklearn import metrics as m

    y_true, y_pred, score = np.asarray(y_true), np.asarray(y_pred), np.asarray(score, dtype=np.float64)
    tn, fp, fn, tp = (int(v) for v in m.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel())
    both = len(np.unique(y_true)) == 2

    def ratio(a, b):
        return a / b if b else None

    sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    precision = ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    n = len(y_true)
    out = {
        "n": int(n), "n_positive": int((y_true == 1).sum()), "n_negative": int((y_true == 0).sum()), "n_failed": 0,
        "accuracy": ratio(tp + tn, n),
        "balanced_accuracy": (sensitivity + specificity) / 2 if both else None,
        "precision": precision, "recall": sensitivity, "sensitivity": sensitivity, "specificity": specificity,
        "f1": f1,
        "roc_auc": float(m.roc_auc_score(y_true, score)) if both else None,
        "pr_auc": float(m.average_precision_score(y_true, score)) if both else None,
        "brier": float(np.mean((score - y_true) ** 2)) if n else None,
        "ece": expected_calibration_error(y_true, score) if n else None,
        "cohen_kappa": _kappa(y_true, y_pred),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "classification_report": m.classification_report(
            y_true, y_pred, labels=[0, 1], target_names=list(class_names), output_dict=True, zero_division=0),
        "outside_training": None,  # share flagged by the model's shift alarm: set by metrics_by_split
    }
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


def reliability_curve(y_true, proba, n_bins: int = 10) -> dict:
    """The binned mean P(fractured) against the observed fractured share, for a reliability diagram.

    Bins are ``n_bins`` equal-width intervals of P ([0, 0.1), [0.1, 0.2), ... [0.9, 1]), the bins of
    :func:`expected_calibration_error`: uniform rather than quantile bins, so that the curves of two
    sources (or two models) share their bins and can be read side by side, and a bin's position says
    what probability it covers. The price is uneven counts: they are returned, and drawn, with each bin.

    Returns
    -------
    dict of arrays, one entry per non-empty bin (empty ones are left out, as in
    ``sklearn.calibration.calibration_curve``): ``bin_low``, ``bin_high`` (the bin's edges),
    ``mean_predicted``, ``observed_rate`` (share of label 1), ``count`` (images; they sum to ``len(y_true)``).
    """
    y_true, proba = np.asarray(y_true, dtype=np.float64), np.asarray(proba, dtype=np.float64)
    bins = np.clip((proba * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    used = count > 0
    mean_predicted = np.bincount(bins, weights=proba, minlength=n_bins)[used] / count[used]
    observed_rate = np.bincount(bins, weights=y_true, minlength=n_bins)[used] / count[used]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"bin_low": edges[:-1][used], "bin_high": edges[1:][used], "mean_predicted": mean_predicted,
            "observed_rate": observed_rate, "count": count[used]}


def expected_calibration_error(y_true, proba, n_bins: int = 10) -> float:
    """Mean gap between P(fractured) and the fractured share, over ``n_bins`` equal-width bins of P weighted by
    their images: 0 for calibrated probabilities, 0.2 when images scored 0.9 are fractured 70% of the time."""
    curve = reliability_curve(y_true, proba, n_bins)
    gaps = np.abs(curve["mean_predicted"] - curve["observed_rate"])
    return float(np.sum(curve["count"] * gaps) / np.sum(curve["count"]))


# Metrics given a group-bootstrap interval in evaluate's ``intervals``.
INTERVAL_KEYS = ("roc_auc", "sensitivity", "specificity", "balanced_accuracy", "brier")


def resampling_units(groups, n: int) -> np.ndarray:
    """Each row's resampling unit for the group bootstrap: its near-duplicate group (numbered in sorted order
    of the group names, as :func:`fracfeat._validation.bootstrap_ci` numbers them), or a unit of its own where
    it has no group."""
    if groups is None:
        return np.arange(n)
    named = np.asarray(groups).astype(str)
    units = np.unique(named, return_inverse=True)[1].astype(np.int64)
    alone = named == ""
    if alone.any():  # "" is no group: each such row is a unit of its own, after the named groups
        units[alone] = units.max() + 1 + np.arange(int(alone.sum()))
        units = np.unique(units, return_inverse=True)[1].astype(np.int64)
    return units


def _replicate_metrics(weights: np.ndarray, y, pred, score, starts) -> dict:
    """:data:`INTERVAL_KEYS` of bootstrap replicates given as row weights (replicates x rows, rows in order of
    score: how often each row was drawn), NaN where a replicate lacks the class a metric needs. Weighted sums
    equal the metrics of the resampled rows; ROC AUC counts the pairs (positive above negative, ties half)
    by score level (``starts``: each level's first row, None when no two scores tie)."""
    w_pos, w_neg = weights * (y == 1), weights * (y == 0)
    n_pos, n_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # einsum, not @: a matrix-vector product through BLAS threads is ten times slower on a shared machine
        sens = np.einsum("ij,j->i", w_pos, (pred == 1).astype(np.float64)) / n_pos
        spec = np.einsum("ij,j->i", w_neg, (pred == 0).astype(np.float64)) / n_neg
        at_pos, at_neg = (w_pos, w_neg) if starts is None else (np.add.reduceat(w_pos, starts, axis=1),
                                                                np.add.reduceat(w_neg, starts, axis=1))
        below = np.cumsum(at_neg, axis=1) - at_neg  # negative weight scored below each level
        auc = np.sum(at_pos * (below + 0.5 * at_neg), axis=1) / (n_pos * n_neg)
        brier = np.einsum("ij,j->i", weights, (score - y) ** 2) / weights.sum(axis=1)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return {"roc_auc": auc, "sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2,
            "brier": brier}


def bootstrap_intervals(y, pred, score, groups=None, *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0, chunk: int = 200) -> dict:
    """Percentile group-bootstrap intervals of :data:`INTERVAL_KEYS` for one set of rows.

    Whole near-duplicate groups are resampled (rows without a group count as their own), so that copies
    of one radiograph never make an interval look narrower than it is. A replicate lacking a class the
    metric needs is left out of that metric (ROC AUC needs both; sensitivity the fractured images). The
    draws are :func:`fracfeat._validation.bootstrap_ci`'s (same seed: same resamples), computed as row
    weights in blocks of ``chunk`` replicates: about 0.1 s for 1,000 replicates of 5,000 rows.

    Returns
    -------
    dict
        ``{metric: {"low": lo, "high": hi} or None}`` (None where the metric is undefined on the rows:
        one class, or no rows), plus ``level``, ``n_boot`` and ``resampled`` ("groups" or "images").
    """
    y, pred, score = np.asarray(y, dtype=np.float64), np.asarray(pred), np.asarray(score, dtype=np.float64)
    units = resampling_units(groups, len(y))
    n_units = int(units.max()) + 1 if len(units) else 0
    resampled = "images" if groups is None or not any(str(g) for g in groups) else "groups"
    out = {"level": float(level), "n_boot": int(n_boot), "resampled": resampled}
    if not n_units:
        return {**{k: None for k in INTERVAL_KEYS}, **out}
    order = np.argsort(score, kind="stable")  # rows in order of score, for ROC AUC
    y, pred, score, units = y[order], pred[order], score[order], units[order]
    starts = np.flatnonzero(np.r_[True, np.diff(score) != 0])
    starts = None if len(starts) == len(score) else starts
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in INTERVAL_KEYS}
    for done in range(0, n_boot, chunk):
        b = min(chunk, n_boot - done)
        picks = rng.integers(0, n_units, (b, n_units))
        counts = np.bincount((picks + n_units * np.arange(b)[:, None]).ravel(), minlength=b * n_units)
        weights = counts.reshape(b, n_units).astype(np.float64)[:, units]
        for k, v in _replicate_metrics(weights, y, pred, score, starts).items():
            draws[k].append(v)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    for k in INTERVAL_KEYS:
        values = np.concatenate(draws[k])
        values = values[~np.isnan(values)]
        out[k] = ({"low": float(np.percentile(values, q[0])), "high": float(np.percentile(values, q[1]))}
                  if len(values) else None)
    return {**{k: out[k] for k in INTERVAL_KEYS}, **{k: out[k] for k in ("level", "n_boot", "resampled")}}


def _kappa(y_true, y_pred):
    from sklearn.metrics import cohen_kappa_score

    if len(np.unique(np.concatenate([y_true, y_pred]))) < 2:
        return None  # both raters used one class: kappa is 0/0
    return float(cohen_kappa_score(y_true, y_pred))


def alarm_of(model):
    """The model's shift alarm (:class:`fracfeat._shift.OutsideTraining`), or None: models saved before 0.3,
    or classifiers made outside :func:`fit`, have none."""
    return getattr(pipeline_of(model), "outside_training_", None)


def _scores(head, X):
    proba = head.predict_proba(X)[:, 1]
    return head.predict(X), proba


@dataclass
class Predictions:
    """One row per evaluated image: true label, predicted label, P(fractured), split and path, and what the
    source says of the image: its near-duplicate group, source (hospital, dataset), body region and projection
    ("" where it says nothing)."""

    y: np.ndarray
    pred: np.ndarray
    score: np.ndarray
    splits: np.ndarray
    paths: np.ndarray
    classes: tuple
    failed_splits: np.ndarray  # split of each image that could not be read
    outside: np.ndarray | None = None  # flagged by the model's shift alarm (None: the model has none)
    groups: np.ndarray | None = None
    sources: np.ndarray | None = None
    regions: np.ndarray | None = None
    failed_by: dict = field(default_factory=dict)  # {"source": values, "region": values...} of the unreadable images
    projections: np.ndarray | None = None

    def column(self, by: str) -> np.ndarray:
        """Each row's value of a :data:`SUBGROUPS` grouping ("source", "region", "projection"): "" where unknown."""
        values = getattr(self, by + "s")
        return np.full(len(self.y), "", dtype=object) if values is None else np.asarray(values).astype(str)


def _described(items, n: int, name: str) -> np.ndarray:
    """``name`` of each record or feature row as a str array ("" where missing): read with getattr, so
    sources made before the metadata columns existed give ""."""
    values = getattr(items, name + "s", None) if not isinstance(items, list) else [
        getattr(r, name, "") for r in items]
    if values is None:
        return np.full(n, "", dtype=object)
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


def predict_rows(model, features_or_source, *, version="latest") -> Predictions:
    """The model's prediction for every labeled image of ``features_or_source`` (see :func:`evaluate`)."""
    pipeline = pipeline_of(model)
    deep, head = split_feature_step(pipeline)
    data = features_or_source
    if isinstance(data, FeatureStore) or (isinstance(data, (str, os.PathLike)) and FeatureStore(data).exists()):
        store = data if isinstance(data, FeatureStore) else FeatureStore(data)
        data = store.open(version)

    if isinstance(data, FeatureSet):
        rows = data.labeled()
        if rows.y is None or not len(rows):
            raise ConfigError(f"{data!r} has no labeled rows to evaluate on")
        if deep is not None and rows.fingerprint and rows.fingerprint != deep.fingerprint_:
            from ._transformer import describe_extractor, feature_parts

            made = " + ".join(part.describe() for part in rows.parts)
            raise ConfigError(
                f"the feature set was made by another extractor (fingerprint {_short(rows.fingerprints)}, {made}) "
                f"than the model's ({_short(d.fingerprint_ for d in feature_parts(deep))}, "
                f"{describe_extractor(deep)}): "
                f"evaluate on the images (a folder or CSV) instead, or on store features made with the model's "
                f"settings")
        X = rows.X
        check_finite_rows(X, rows.paths, what="evaluate", fix=bad_rows_fix(rows.store))
        pred, score = _scores(head, X)
        y, splits, failed_splits = rows.y, rows.splits, np.array([], dtype=str)
        classes, paths = rows.classes, rows.paths
        described, failed_by = {k: _described(rows, len(rows), k) for k in ("group", *SUBGROUPS)}, {}
    else:
        if deep is None:
            raise ConfigError("this model takes feature arrays: pass a FeatureSet or store, not images")
        records, desc = load_records(data)
        records = [r for r in records if r.label != UNLABELED]
        if not records:
            raise SourceError(f"{desc} holds no labeled images to evaluate on")
        X, ok, failures = deep.features_of_paths([r.path for r in records], strict=False)
        failed = np.array(sorted(i for i, _ in failures), dtype=np.int64)
        all_splits = np.array([r.split for r in records])
        failed_splits = all_splits[failed] if len(failed) else np.array([], dtype=str)
        if not len(ok):
            raise SourceError(f"none of the {len(records)} labeled images of {desc} could be read; "
                              f"first: {records[failures[0][0]].path}: {failures[0][1]}")
        pred, score = _scores(head, X)
        y = np.array([records[i].label for i in ok])
        splits = all_splits[ok]
        every = {k: _described(records, len(records), k) for k in ("group", *SUBGROUPS)}
        described = {k: v[np.asarray(ok, dtype=np.int64)] for k, v in every.items()}
        failed_by = {k: every[k][failed] for k in SUBGROUPS}
        paths = np.array([records[i].path for i in ok], dtype=object)
        classes = classes_from_rows(np.array([r.label for r in records]), np.array([r.class_name for r in records]))

    alarm = alarm_of(pipeline)
    return Predictions(y=np.asarray(y), pred=np.asarray(pred), score=np.asarray(score, dtype=np.float64),
                       splits=np.asarray(splits), paths=np.asarray(paths), classes=tuple(classes),
                       failed_splits=np.asarray(failed_splits), outside=None if alarm is None else alarm.predict(X),
                       groups=described["group"], failed_by=failed_by,
                       **{name + "s": described[name] for name in SUBGROUPS})


def evaluate(model, features_or_source, *, split=None, version="latest", by=None, n_boot: int = 1000,
             seed: int = 0) -> dict:
    """Score a fitted model on labeled images or feature rows, per split.

    Parameters
    ----------
    model : Pipeline, FitResult, or path to a joblib file
        A Pipeline from :func:`fit` (image paths in), or any fitted classifier of feature arrays with
        ``predict_proba``.
    features_or_source : FeatureSet, FeatureStore, store directory, or image source
        Feature rows (they must come from the model's extractor: same fingerprint), or any source
        ``extract`` takes (class folders, split folders, CSV manifest) whose images the Pipeline reads.
        Unlabeled rows are left out.
    split : str, optional
        Only this split ("train", "val", "test", or "all" for a source without splits): returns its
        metrics dict directly.
    version : int or "latest"
        Store version, when ``features_or_source`` is a store.
    by : sequence of {"source", "region", "projection"}, optional
        Groupings to break the figures down by (the manifest's ``source``, ``region`` and ``projection``
        columns, or a DICOM header's; :data:`SUBGROUPS`). By default every one the data has (some image with
        a non-empty value); ``()`` for none.
    n_boot, seed : int
        Replicates and seed of the group-bootstrap intervals (seeded: the same data gives the same intervals).

    Returns
    -------
    dict
        ``{split: metrics}`` with one entry per split of the source ("all" when it has none); each
        metrics dict has the keys of :data:`METRIC_KEYS`: ``accuracy``, ``balanced_accuracy``,
        ``precision``, ``recall`` (= ``sensitivity``), ``specificity``, ``f1``, ``roc_auc``, ``pr_auc``,
        ``brier``, ``ece``, ``cohen_kappa``, ``confusion_matrix`` (``[[tn, fp], [fn, tp]]``),
        ``classification_report``, the counts ``n``, ``n_positive``, ``n_negative``, ``n_failed`` (images that
        could not be read) and ``outside_training`` (the share the model's shift alarm flags); then those
        of :data:`DETAIL_KEYS`:

        - ``intervals``: 95% group-bootstrap intervals (:func:`bootstrap_intervals`) of ``roc_auc``,
          ``sensitivity``, ``specificity``, ``balanced_accuracy`` and ``brier``, ``{"low", "high"}`` each
          (None where the figure is undefined);
        - ``reliability``: :func:`reliability_curve` of the split, as lists;
        - ``subgroups``: ``{"source": {value: metrics}, "region": {...}, "projection": {...}}`` for the groupings of
          ``by``, each with the keys above and ``intervals`` ("" is the value of images without one;
          a source's entry has its own ``reliability`` when there are several sources). A subgroup of
          one class has None for the figures that need both, and its counts.

    Examples
    --------
    >>> from fracfeat import evaluate
    >>> report = evaluate("model.joblib", "data/fracatlas_splits")   # doctest: +SKIP
    >>> report["test"]["roc_auc"], report["test"]["sensitivity"]     # doctest: +SKIP
    """
    report = checked_metrics(predict_rows(model, features_or_source, version=version), by=by, n_boot=n_boot,
                             seed=seed)
    if split is not None:
        if split not in report:
            raise ConfigError(f"split={split!r}: the data has {list(report)}")
        return report[split]
    return report


# One-sided z for "far below chance": p < 0.01 that a model ranking at random scores this low.
INVERSE_RANKING_Z = 2.33


def ranking_alarm(roc_auc, n_positive: int, n_negative: int, where: str) -> str | None:
    """A warning in plain words when ``roc_auc`` is far below 0.5, else None.

    "Far below" is a one-sided test against chance: the ROC AUC is more than 2.33 standard errors below
    0.5, the standard error of a randomly ranking model being sqrt((n1 + n2 + 1) / (12 n1 n2)) (the
    Mann-Whitney statistic's). So 0.40 on 19 normal images passes as noise, 0.40 on 800 does not.
    """
    if roc_auc is None or not n_positive or not n_negative:
        return None
    se = np.sqrt((n_positive + n_negative + 1) / (12.0 * n_positive * n_negative))
    if (0.5 - float(roc_auc)) / se <= INVERSE_RANKING_Z:
        return None
    return (f"The model ranks inversely on {where}: ROC AUC {float(roc_auc):.3f}, far below chance (0.5) for "
            f"{n_positive} + {n_negative} images. It scores not-fractured radiographs above fractured ones, so "
            f"something is wrong with the data (labels swapped, another source or scanner than it was trained "
            f"on) or with the model; do not use its predictions until that is understood.")


def alarm_places(metrics: dict, what: str = ""):
    """(where, metrics, is_subgroup) of each split of :func:`evaluate`'s ``{split: metrics}``, then of each of
    its subgroups that is not the whole split ("split 'test', source 'hbfmid'"): the places alarms speak of."""
    for split, m in metrics.items():
        where = f"{what + ', ' if what else ''}{'every image' if split == 'all' else f'split {split!r}'}"
        yield where, m, False
        inside = f"{what + ', ' if what else ''}{'' if split == 'all' else f'split {split!r}, '}"
        for key, values in (m.get("subgroups") or {}).items():
            for value, sub in values.items():
                if sub.get("n") != m.get("n"):
                    yield f"{inside}{key} {str(value) or '(not given)'!r}", sub, True


def ranking_alarms(metrics: dict, what: str = "") -> list[str]:
    """:func:`ranking_alarm` of each split (and subgroup) of :func:`evaluate`'s ``{split: metrics}``."""
    alarms = []
    for where, m, _ in alarm_places(metrics, what):
        alarm = ranking_alarm(m.get("roc_auc"), m.get("n_positive", 0), m.get("n_negative", 0), where)
        if alarm:
            alarms.append(alarm)
    return alarms


# The shift alarm flags about 5% of new images from the training source; twice that is a warning.
SHIFT_WARNING = 0.10
SHIFT_BASE_RATE = 0.05


def flagged_beyond_chance(share: float, n: int, p_value: float = 0.01) -> bool:
    """Whether ``share`` of ``n`` images flagged is unlikely (one-sided binomial p < ``p_value``) from images of
    the training source, which the alarm flags at SHIFT_BASE_RATE: 1 of 9 (11%) is not, 5 of 9 is."""
    k = int(round(share * n))
    tail = sum(math.comb(n, i) * SHIFT_BASE_RATE ** i * (1 - SHIFT_BASE_RATE) ** (n - i) for i in range(k, n + 1))
    return tail < p_value


def shift_alarms(metrics: dict, what: str = "") -> list[str]:
    """A warning for each split of :func:`evaluate` where the shift alarm flags more than SHIFT_WARNING, and for
    each subgroup where it does so beyond chance (:func:`flagged_beyond_chance`: a small subgroup's share is
    noisy, and a warning of 2 images in 9 would drown the one of a whole source)."""
    alarms = []
    for where, m, subgroup in alarm_places(metrics, what):
        share = m.get("outside_training")
        if share is not None and share > SHIFT_WARNING and (not subgroup or flagged_beyond_chance(share, m["n"])):
            images = "the images" if where == "every image" else f"the images of {where}"
            alarms.append(f"{share:.0%} of {images} do not look like the model's training images (its "
                          f"shift alarm flags them; about 5% of new images from the training source are): another "
                          f"hospital, scanner, framing or kind of radiograph. Figures on such images mean little, "
                          f"and the model's threshold may not hold: check it on labeled images of this source, or "
                          f"train on them, before relying on it.")
    return alarms


def checked_metrics(rows: Predictions, what: str = "", *, by=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`metrics_by_split`, logging a warning for each split (and subgroup) where the model ranks
    inversely or where its shift alarm flags many images."""
    metrics = metrics_by_split(rows, by, n_boot=n_boot, seed=seed)
    for alarm in ranking_alarms(metrics, what) + shift_alarms(metrics, what):
        log.warning("%s", alarm)
    return metrics


def metrics_by_split(rows: Predictions, by=None, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """``{split: metrics}`` of :func:`evaluate` from per-image predictions."""
    splits, failed_splits = rows.splits, rows.failed_splits
    names = [s for s in ("train", "val", "test") if s in set(splits)] + sorted(set(splits) - {"train", "val", "test", ""})
    if not names or "" in set(splits):
        names = names + ["all"] if names else ["all"]
    groupings = subgroup_keys(rows, by)
    report = {}
    for name in names:
        mask = np.ones(len(rows.y), bool) if name == "all" else splits == name
        failed = np.ones(len(failed_splits), bool) if name == "all" else failed_splits == name
        metrics = _rows_metrics(rows, mask, failed, n_boot, seed)
        metrics["reliability"] = _listed(reliability_curve(rows.y[mask], rows.score[mask]))
        metrics["subgroups"] = {key: _subgroups(rows, key, mask, failed, n_boot, seed) for key in groupings}
        report[name] = metrics
    return report


# The groupings evaluate can break its figures down by: Predictions columns, from the source's columns.
SUBGROUPS = ROW_METADATA


def subgroup_keys(rows: Predictions, by=None) -> tuple:
    """The groupings to report: ``by`` as given (checked), or by default each of :data:`SUBGROUPS` the rows
    say something of (a non-empty value)."""
    if by is None:
        return tuple(k for k in SUBGROUPS if any(rows.column(k)))
    by = (by,) if isinstance(by, str) else tuple(by)
    for key in by:
        if key not in SUBGROUPS:
            raise ConfigError(f"by={key!r}: evaluate breaks figures down by {list(SUBGROUPS)}; pick among them")
        if not any(rows.column(key)):
            raise ConfigError(f"by={key!r}: no image of the data has a {key}; give a CSV manifest with a "
                              f"{key!r} column, or leave {key!r} out of by=")
    return by


def _rows_metrics(rows: Predictions, mask, failed, n_boot: int, seed: int) -> dict:
    """:func:`binary_metrics` of the masked rows, with their unreadable images, shift-alarm share and intervals."""
    y, pred, score = rows.y[mask], rows.pred[mask], rows.score[mask]
    metrics = binary_metrics(y, pred, score, rows.classes)
    metrics["n_failed"] = int(np.sum(failed))
    metrics["outside_training"] = (None if rows.outside is None or not mask.any()
                                   else float(rows.outside[mask].mean()))
    groups = None if rows.groups is None else np.asarray(rows.groups)[mask]
    metrics["intervals"] = bootstrap_intervals(y, pred, score, groups, n_boot=n_boot, seed=seed)
    return metrics


def _subgroups(rows: Predictions, key: str, mask, failed, n_boot: int, seed: int) -> dict:
    """``{value: metrics}`` of each value of ``key`` among the masked rows ("" for rows without one); the
    sources' entries carry their own reliability curve when there are several."""
    column = rows.column(key)
    failed_column = np.asarray(rows.failed_by.get(key, np.full(len(failed), ""))).astype(str)
    out = {}
    values = sorted(set(column[mask]))  # a value none of whose images could be read has no figures to show
    for value in values:
        inside = mask & (column == value)
        value = str(value)
        out[value] = _rows_metrics(rows, inside, failed & (failed_column == value), n_boot, seed)
        if key == "source" and len(values) > 1:
            out[value]["reliability"] = _listed(reliability_curve(rows.y[inside], rows.score[inside]))
    return out


def _listed(curve: dict) -> dict:
    """A :func:`reliability_curve` as plain lists (JSON, equality)."""
    return {k: v.tolist() for k, v in curve.items()}
