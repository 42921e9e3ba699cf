"""Exceptions users can cause. Each message names the problem and the fix."""

import numpy as np


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


class FeatureError(FracfeatError, ValueError):
    """Feature rows hold NaN or inf (a damaged store, damaged weights, or an image the extractor overflows on)."""


def check_finite_rows(X, paths, *, what: str, fix: str, rows: str = "feature rows hold NaN or inf") -> None:
    """Raise a FeatureError when rows of ``X`` hold NaN or inf: how many, the first image paths, and ``fix``.

    scikit-learn would refuse them with a bare ``ValueError`` (or an estimator would learn from them).
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.dtype.kind not in "fc":
        return
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(bad):
        raise FeatureError(f"{what}: {len(bad)} of {len(X)} {rows} ({first_paths(paths, bad)}): {fix}")


def bad_rows_fix(store) -> str:
    """What to do about NaN or inf rows read from a store."""
    return (f"re-extract these images into a new store version, or the store is damaged: run "
            f"`fracfeat store verify {store or 'STORE'}`")


def first_paths(paths, rows, n: int = 3) -> str:
    """The paths of the first ``n`` of ``rows``, and how many more."""
    names = ", ".join(str(paths[i]) for i in rows[:n])
    return names + (f" and {len(rows) - n} more" if len(rows) > n else "")


class UnreadableImagesError(ImageError):
    """Images that a prediction needs cannot be read. ``failures`` holds ``(path, reason)`` of each.

    The message ends with ``fix``, what the caller can do where it called from (:meth:`with_fix` makes
    the same error with another: the CLI's own arguments, say).
    """

    def __init__(self, failures, n_images: int, fix: str, what: str = ""):
        self.failures, self.n_images, self.what = list(failures), int(n_images), what
        shown = "; ".join(f"{path}: {reason}" for path, reason in self.failures[:3])
        more = f"; and {len(self.failures) - 3} more" if len(self.failures) > 3 else ""
        super().__init__(f"{what}{len(self.failures)} of {n_images} images cannot be read ({shown}{more}): {fix}")

    def with_fix(self, fix: str) -> "UnreadableImagesError":
        return UnreadableImagesError(self.failures, self.n_images, fix, self.what)
