"""fracfeat: fracture classification on bone radiographs with deep features and classical classifiers.

Public API (everything else lives in private modules)::

    from fracfeat import extract, fit, evaluate, report, run, load_model, presets, FeatureStore, FeatureSet, DeepFeatures
    from fracfeat import save_model  # a fitted Pipeline to a .joblib file, atomically
    from fracfeat import join_features  # features of several extractors side by side
    from fracfeat import adapt, recalibrate  # a model to a new site: unlabeled images; a few labeled ones
    from fracfeat import explain  # where the model looks: a heatmap per image
    from fracfeat import tune_worker  # another process joining fit's study on a shared storage
    from fracfeat import calibrate  # time the extraction paths this machine has; "auto" uses the fastest
    from fracfeat import quantize  # an int8 backbone from your images (NNCF), for extract(quantized=DIR)

Importing fracfeat is cheap: TensorFlow/Keras, XGBoost, Optuna and matplotlib load only when used.
"""

from ._errors import (
    ConfigError,
    FracfeatError,
    ImageError,
    MissingDependencyError,
    ModelError,
    SourceError,
    StoreError,
    WeightsError,
)
from ._config import ExtractorSettings
from ._explain import explain
from ._extract import extract
from ._featureset import FeatureSet, join_features
from ._fit import FitResult, fit, tune_worker
from ._metrics import METRIC_KEYS, evaluate
from ._model_io import load_model, save_model
from ._path_choice import calibrate
from ._predict import predict
from ._presets import Preset, presets
from ._quantize import quantize
from ._report import report
from ._run import RunResult, run
from ._store import FeatureStore
from ._version import __version__

__all__ = [
    "extract",
    "ExtractorSettings",
    "fit",
    "tune_worker",
    "evaluate",
    "predict",
    "explain",
    "calibrate",
    "quantize",
    "load_model",
    "save_model",
    "report",
    "run",
    "RunResult",
    "presets",
    "Preset",
    "DeepFeatures",
    "FitResult",
    "METRIC_KEYS",
    "FeatureSet",
    "join_features",
    "adapt",
    "recalibrate",
    "FeatureStore",
    "FracfeatError",
    "ConfigError",
    "ImageError",
    "MissingDependencyError",
    "ModelError",
    "SourceError",
    "StoreError",
    "WeightsError",
    "__version__",
]


# Names whose modules import scikit-learn at their top (estimator classes): loaded when first asked for.
_LAZY = {"DeepFeatures": "_transformer", "adapt": "_adapt", "recalibrate": "_recalibrate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fracfeat' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
