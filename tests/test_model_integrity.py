"""A saved model refuses weights and feature stores that would silently give wrong predictions."""

from __future__ import annotations

import shutil

import joblib
import pytest

from conftest import TINY
from fracfeat import ConfigError, WeightsError, evaluate, extract, fit

FAST = dict(n_trials=2, cv=2)


@pytest.mark.slow
def test_saved_pipeline_refuses_weights_changed_since_fit(real_images, vgg16_weights, tmp_path):
    weights = tmp_path / "vgg16.weights.h5"
    shutil.copy(vgg16_weights, weights)
    paths = real_images["fractured"][:4] + real_images["not_fractured"][:4]
    fs = extract(paths, labels=[1] * 4 + [0] * 4, store=tmp_path / "store", backbone="vgg16", weights=weights,
                 image_size=32, progress=False)
    model = fit(fs, **FAST).save(tmp_path / "model.joblib")
    assert joblib.load(model).predict([str(p) for p in paths]).shape == (8,)  # the weights as recorded: fine

    with open(weights, "ab") as f:  # the file at the recorded path changes after the model was saved
        f.write(b"\0")
    loaded = joblib.load(model)
    with pytest.raises(WeightsError, match=r"are not the weights these features were made with \(file:sha256:.*"
                                           r"Pass the original file.*features__weights"):
        loaded.predict([str(paths[0])])


@pytest.mark.slow
def test_evaluate_refuses_rows_of_another_extractor(tiny_features, tmp_path):
    """Same width (512 at 48 px as at 32 px) is the dangerous case: the classifier would accept the rows."""
    pipeline = fit(tiny_features, **FAST).pipeline
    paths = list(tiny_features.paths[:4]) + list(tiny_features.paths[-4:])
    labels = list(tiny_features.y[:4]) + list(tiny_features.y[-4:])
    # (another backbone changes the fingerprint the same way; tests/test_metrics.py covers a foreign one)
    other = extract(paths, labels=labels, store=tmp_path / "store48", **dict(TINY, image_size=48))
    assert other.n_features == tiny_features.n_features
    with pytest.raises(ConfigError, match=r"made by another extractor .*vgg16 48px.*vgg16 32px.*evaluate on the images"):
        evaluate(pipeline, other)
    assert evaluate(pipeline, tiny_features, split="all")["n"] == len(tiny_features)  # its own rows are fine


def test_fit_refuses_a_single_class_source(real_images, tmp_path):
    folder = tmp_path / "only-fractured" / "fractured"
    folder.mkdir(parents=True)
    for p in real_images["fractured"][:4]:
        shutil.copy(p, folder)
    fs = extract(folder.parent, store=tmp_path / "store", **TINY)
    with pytest.raises(ConfigError, match="fit needs labeled images of both classes; .* has one class only"):
        fit(fs, **FAST)
