"""Exceptions users can cause. Each message names the problem and the fix."""


class FracfeatError(Exception):
    """Base class of every error fracfeat raises on purpose."""


class SourceError(FracfeatError, ValueError):
    """The source (folder, CSV, path list) cannot be turned into labelled image records."""


class ConfigError(FracfeatError, ValueError):
    """A parameter is out of range or unknown (backbone, image size, pooling, precision...)."""


class ImageError(FracfeatError):
    """An image could not be decoded (raised only with strict=True; otherwise kept as a failure row)."""


class StoreError(FracfeatError):
    """The feature store is missing, damaged, locked, or does not hold what was asked for."""


class WeightsError(FracfeatError):
    """Backbone weights cannot be found, downloaded or verified."""


class MissingDependencyError(FracfeatError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


class ModelError(FracfeatError, ValueError):
    """A saved model is missing, unreadable, or not a fracfeat classifier."""
