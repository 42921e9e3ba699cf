"""fracfeat: fracture classification on bone radiographs with deep features and classical classifiers.

Public API (everything else lives in private modules)::

    from fracfeat import extract, FeatureStore, FeatureSet

Importing fracfeat is cheap: TensorFlow/Keras, XGBoost and matplotlib load only when used.
"""

from ._errors import (
    ConfigError,
    FracfeatError,
    ImageError,
    MissingDependencyError,
    SourceError,
    StoreError,
    WeightsError,
)
from ._extract import extract
from ._featureset import FeatureSet
from ._store import FeatureStore
from ._version import __version__

__all__ = [
    "extract",
    "FeatureSet",
    "FeatureStore",
    "FracfeatError",
    "ConfigError",
    "ImageError",
    "MissingDependencyError",
    "SourceError",
    "StoreError",
    "WeightsError",
    "__version__",
]
