"""predict(): a fitted model's probability of a fracture and label for each image, in the model's class names."""

from __future__ import annotations

import os

from ._featureset import DEFAULT_CLASSES
from ._metrics import split_feature_step
from ._model_io import pipeline_of


def class_names(model) -> tuple[str, str]:
    """Names of label 0 and label 1 as the model's training source spelled them (fracfeat's own before 0.3)."""
    deep, _ = split_feature_step(pipeline_of(model))
    trained = getattr(deep, "trained_on_", None) or {}
    return tuple(trained.get("classes") or DEFAULT_CLASSES)


def predict(model, images) -> list[dict]:
    """Path, probability of a fracture, and predicted label of each image.

    Parameters
    ----------
    model : Pipeline, FitResult, or path of a saved model
    images : sequence of paths
        Image files, any format ``extract`` reads.

    Returns
    -------
    list of dict
        ``{"path", "probability", "label"}`` per image, in order; ``label`` is one of the model's class
        names (:func:`class_names`), by the model's own threshold.

    Examples
    --------
    >>> from fracfeat import predict
    >>> predict("results/model.joblib", ["a.jpg"])                       # doctest: +SKIP
    [{'path': 'a.jpg', 'probability': 0.912, 'label': 'fractured'}]
    """
    pipeline = pipeline_of(model)
    paths = [os.fspath(p) for p in images]
    proba = pipeline.predict_proba(paths)[:, 1]
    labels = pipeline.predict(paths)
    names = class_names(pipeline)
    return [{"path": p, "probability": round(float(q), 6), "label": names[int(k)]}
            for p, q, k in zip(paths, proba, labels)]
