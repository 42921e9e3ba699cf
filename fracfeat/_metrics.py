"""evaluate(): the metrics that matter on imbalanced radiographs, per split, under stable keys."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from ._errors import ConfigError, SourceError
from ._featureset import FeatureSet, classes_from_rows
from ._model_io import load_model, pipeline_of  # noqa: F401  (load_model: re-exported, its old home)
from ._sources import UNLABELED, load_records
from ._store import FeatureStore

log = logging.getLogger("fracfeat")

# Keys of every per-split metrics dict, in this order; scripts may rely on them.
METRIC_KEYS = (
    "n", "n_positive", "n_negative", "n_failed",
    "accuracy", "balanced_accuracy", "precision", "recall", "sensitivity", "specificity", "f1",
    "roc_auc", "pr_auc", "brier", "ece", "cohen_kappa", "confusion_matrix", "classification_report", "outside_training",
)


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


def expected_calibration_error(y_true, proba, n_bins: int = 10) -> float:
    """Mean gap between P(fractured) and the fractured share, over ``n_bins`` equal-width bins of P weighted by
    their images: 0 for calibrated probabilities, 0.2 when images scored 0.9 are fractured 70% of the time."""
    y_true, proba = np.asarray(y_true, dtype=np.float64), np.asarray(proba, dtype=np.float64)
    bins = np.minimum((proba * n_bins).astype(int), n_bins - 1)
    gap = 0.0
    for b in np.unique(bins):
        inside = bins == b
        gap += inside.sum() * abs(proba[inside].mean() - y_true[inside].mean())
    return float(gap / len(proba))


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
    """One row per evaluated image: true label, predicted label, P(fractured), split and path."""

    y: np.ndarray
    pred: np.ndarray
    score: np.ndarray
    splits: np.ndarray
    paths: np.ndarray
    classes: tuple
    failed_splits: np.ndarray  # split of each image that could not be read
    outside: np.ndarray | None = None  # flagged by the model's shift alarm (None: the model has none)


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
        pred, score = _scores(head, X)
        y, splits, failed_splits = rows.y, rows.splits, np.array([], dtype=str)
        classes, paths = rows.classes, rows.paths
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
        paths = np.array([records[i].path for i in ok], dtype=object)
        classes = classes_from_rows(np.array([r.label for r in records]), np.array([r.class_name for r in records]))

    alarm = alarm_of(pipeline)
    return Predictions(y=np.asarray(y), pred=np.asarray(pred), score=np.asarray(score, dtype=np.float64),
                       splits=np.asarray(splits), paths=np.asarray(paths), classes=tuple(classes),
                       failed_splits=np.asarray(failed_splits), outside=None if alarm is None else alarm.predict(X))


def evaluate(model, features_or_source, *, split=None, version="latest") -> dict:
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

    Returns
    -------
    dict
        ``{split: metrics}`` with one entry per split of the source ("all" when it has none); each
        metrics dict has the keys of :data:`METRIC_KEYS`: ``accuracy``, ``balanced_accuracy``,
        ``precision``, ``recall`` (= ``sensitivity``), ``specificity``, ``f1``, ``roc_auc``, ``pr_auc``,
        ``cohen_kappa``, ``confusion_matrix`` (``[[tn, fp], [fn, tp]]``), ``classification_report``, and
        the counts ``n``, ``n_positive``, ``n_negative``, ``n_failed`` (images that could not be read).

    Examples
    --------
    >>> from fracfeat import evaluate
    >>> report = evaluate("model.joblib", "data/fracatlas_splits")   # doctest: +SKIP
    >>> report["test"]["roc_auc"], report["test"]["sensitivity"]     # doctest: +SKIP
    """
    report = checked_metrics(predict_rows(model, features_or_source, version=version))
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


def ranking_alarms(metrics: dict, what: str = "") -> list[str]:
    """:func:`ranking_alarm` of each split of :func:`evaluate`'s ``{split: metrics}``."""
    alarms = []
    for split, m in metrics.items():
        where = f"{what + ', ' if what else ''}{'every image' if split == 'all' else f'split {split!r}'}"
        alarm = ranking_alarm(m.get("roc_auc"), m.get("n_positive", 0), m.get("n_negative", 0), where)
        if alarm:
            alarms.append(alarm)
    return alarms


# The shift alarm flags about 5% of new images from the training source; twice that is a warning.
SHIFT_WARNING = 0.10


def shift_alarms(metrics: dict, what: str = "") -> list[str]:
    """A warning for each split of :func:`evaluate` where the shift alarm flags more than SHIFT_WARNING."""
    alarms = []
    for split, m in metrics.items():
        share = m.get("outside_training")
        if share is not None and share > SHIFT_WARNING:
            where = f"{what + ', ' if what else ''}{'every image' if split == 'all' else f'split {split!r}'}"
            alarms.append(f"{share:.0%} of the images of {where} do not look like the model's training images (its "
                          f"shift alarm flags them; about 5% of new images from the training source are): another "
                          f"hospital, scanner, framing or kind of radiograph. Figures on such images mean little, "
                          f"and the model's threshold may not hold: check it on labeled images of this source, or "
                          f"train on them, before relying on it.")
    return alarms


def checked_metrics(rows: Predictions, what: str = "") -> dict:
    """:func:`metrics_by_split`, logging a warning for each split where the model ranks inversely or where
    its shift alarm flags many images."""
    metrics = metrics_by_split(rows)
    for alarm in ranking_alarms(metrics, what) + shift_alarms(metrics, what):
        log.warning("%s", alarm)
    return metrics


def metrics_by_split(rows: Predictions) -> dict:
    """``{split: metrics}`` of :func:`evaluate` from per-image predictions."""
    y, pred, score, splits, failed_splits = rows.y, rows.pred, rows.score, rows.splits, rows.failed_splits
    classes = rows.classes
    names = [s for s in ("train", "val", "test") if s in set(splits)] + sorted(set(splits) - {"train", "val", "test", ""})
    if not names or "" in set(splits):
        names = names + ["all"] if names else ["all"]
    report = {}
    for name in names:
        mask = np.ones(len(y), bool) if name == "all" else splits == name
        metrics = binary_metrics(y[mask], pred[mask], score[mask], classes)
        metrics["n_failed"] = int(len(failed_splits) if name == "all" else (failed_splits == name).sum())
        metrics["outside_training"] = None if rows.outside is None else float(rows.outside[mask].mean())
        report[name] = metrics
    return report
