"""predict(): a fitted model's probability of a fracture and label for each image, in the model's class names."""

from __future__ import annotations

import os

import numpy as np

from ._errors import ConfigError, UnreadableImagesError
from ._featureset import DEFAULT_CLASSES
from ._metrics import alarm_of, split_feature_step
from ._model_io import pipeline_of


def class_names(model) -> tuple[str, str]:
    """Names of label 0 and label 1 as the model's training source spelled them (fracfeat's own before 0.3)."""
    deep, _ = split_feature_step(pipeline_of(model))
    trained = getattr(deep, "trained_on_", None) or {}
    return tuple(trained.get("classes") or DEFAULT_CLASSES)


def features_of_images(deep, paths: list[str]) -> np.ndarray:
    """The feature step's rows of every image, or one error naming each file that cannot be read."""
    if not paths:
        raise ConfigError("predict got no images: give a list of one or more image paths")
    X, _, failures = deep.features_of_paths(paths)
    if failures:
        raise UnreadableImagesError([(paths[i], reason) for i, reason in failures], len(paths),
                                    "fix them or leave them out of predict's images")
    return X


def predict(model, images) -> list[dict]:
    """Path, probability of a fracture, predicted label, and the shift alarm's verdict for each image.

    Parameters
    ----------
    model : Pipeline, FitResult, or path of a saved model
    images : sequence of paths
        Image files, any format ``extract`` reads.

    Returns
    -------
    list of dict
        ``{"path", "probability", "label", "outside_training"}`` per image, in order. ``label`` is one of
        the model's class names (:func:`class_names`), by the model's own threshold. ``outside_training``
        is True when the image does not look like the model's training images (its features lie outside
        theirs: another hospital, scanner or framing, or not a radiograph of the trained kind), so the
        probability means little; None for models saved before fracfeat 0.3, which have no alarm.

    Examples
    --------
    >>> from fracfeat import predict
    >>> predict("results/model.joblib", ["a.jpg"])                       # doctest: +SKIP
    [{'path': 'a.jpg', 'probability': 0.912, 'label': 'fractured', 'outside_training': False}]
    """
    pipeline = pipeline_of(model)
    deep, head = split_feature_step(pipeline)
    paths = [os.fspath(p) for p in images]
    X = paths if deep is None else features_of_images(deep, paths)  # once, for the classifier and the alarm
    proba, labels = head.predict_proba(X)[:, 1], head.predict(X)
    alarm = alarm_of(pipeline)
    outside = [None] * len(paths) if alarm is None else [bool(v) for v in alarm.predict(np.asarray(X))]
    names = class_names(pipeline)
    return [{"path": p, "probability": round(float(q), 6), "label": names[int(k)], "outside_training": o}
            for p, q, k, o in zip(paths, proba, labels, outside)]
