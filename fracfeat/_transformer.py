"""DeepFeatures: the scikit-learn transformer that turns image paths (or arrays) into store features;
JoinedFeatures: several of them side by side.

It runs the very code ``extract`` runs (:class:`fracfeat._engine.FeatureEngine`), so a classifier
trained on store rows sees identical features at prediction time. The backbone is built lazily on
first use and is never pickled: a saved Pipeline is the size of its classifier, and the weights file
is checked against the recorded sha256 before the backbone is built.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import FeatureUnion
from sklearn.utils.validation import check_is_fitted

from ._backbones import is_keras_model, model_object_weights
from ._config import ExtractorConfig, ExtractorSettings, settings_doc
from ._engine import FeatureEngine, verified_weights
from ._errors import ConfigError, UnreadableImagesError, check_finite_rows
from ._quantize import resolve_quantized
from ._runtimes import INT8_IDENTITY


class DeepFeatures(TransformerMixin, BaseEstimator):
    """Image paths or uint8 images -> deep features of a pretrained Keras backbone.

    Parameters
    ----------
    weights : "imagenet", path, or None
        Keras' ImageNet weights, a Keras weights file of the no-top model, or None for seeded random
        weights (tests); with ``backbone`` a ``keras.Model`` object, left out (the object carries its own).
    weights_identity : str, optional
        The identity the weights must have (``"file:sha256:<hex>"``, ``"imagenet:sha256:<hex>"`` or
        ``"random:he-normal:seed=0"``). When set, ``weights`` is verified against it on first use and
        a mismatch raises :class:`fracfeat.WeightsError`; ``fit`` then does not read the weights file.
    batch_size : int
        Images per forward pass.
    workers : int, optional
        Decoding threads.
{settings}
        A Pipeline made by :func:`fracfeat.fit` holds the settings its store version was made with
        (precision and runtime resolved, never "auto"), so its features equal the stored ones.

    Attributes
    ----------
    config_ : ExtractorConfig
        The resolved extractor settings (no "auto" left).
    fingerprint_ : str
        The extractor fingerprint; equal to the store version's when made by :meth:`from_provenance`.
    trained_on_ : dict
        Set by :func:`fracfeat.fit`: store, version and fingerprint of the training features.

    Notes
    -----
    The parameters are ``backbone``, ``weights``, then every field of :class:`fracfeat.ExtractorSettings`,
    then ``weights_identity``, ``batch_size`` and ``workers``: ``__init__`` takes its signature from the
    settings type, so a new extractor option is a parameter here with nothing to add.

    scikit-learn's ``estimator_checks`` are run in ``tests/test_transformer.py``: the API checks pass
    (clone, get/set_params, no work in ``__init__``, fit returns self, unfitted errors...); the checks
    that feed numeric tables to ``transform`` or expect ``fit`` to validate one are listed there
    (``SKIPPED_CHECKS``) with the reason: the input here is images, not a feature table.
    ``pipeline[1:]`` is the part that takes feature tables, and it is plain scikit-learn.

    Examples
    --------
    >>> from fracfeat import DeepFeatures
    >>> deep = DeepFeatures("vgg16", weights="vgg16_notop.weights.h5")   # doctest: +SKIP
    >>> X = deep.fit_transform(["a.jpg", "b.jpg"])                         # doctest: +SKIP
    >>> X.shape                                                           # doctest: +SKIP
    (2, 512)
    """

    def __init__(self, *args, **kwargs):
        bound = DeepFeatures.__init__.__signature__.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for name, value in list(bound.arguments.items())[1:]:
            setattr(self, name, value)

    def __setstate__(self, state):
        # A model saved before a setting existed lacks its attribute: it was made at the setting's default.
        super().__setstate__({**_DEFAULTS, **state})

    def settings(self) -> ExtractorSettings:
        """This transformer's extractor settings, as given ("auto" allowed)."""
        return ExtractorSettings(**{name: getattr(self, name) for name in ExtractorSettings.names()})

    @classmethod
    def from_provenance(cls, provenance: dict, weights=None, **params) -> "DeepFeatures":
        """A fitted DeepFeatures that makes exactly the features of a store version.

        Parameters
        ----------
        provenance : dict
            ``FeatureSet.provenance`` or ``FeatureStore.provenance(version)``.
        weights : "imagenet", path, or None
            Where the weights are now; by default where the version recorded them.
        **params
            Other parameters (``batch_size``, ``workers``).
        """
        config = ExtractorConfig.from_provenance(provenance)
        if weights is None:
            kind = provenance.get("weights_kind", "")
            weights = {"random": None, "imagenet": provenance.get("weights_path") or "imagenet"}.get(
                kind, provenance.get("weights_path") or None)
        deep = cls(weights=weights, weights_identity=config.weights, **vars(config.settings()), **params)
        deep.fit()
        if deep.fingerprint_ != config.fingerprint:
            raise ConfigError(
                f"this fracfeat ({deep.config_.decode}, feature code v{deep.config_.feature_code_version}) would not "
                f"reproduce the store's features ({config.decode}, feature code v{config.feature_code_version}); "
                f"re-extract the images with this version of fracfeat"
            )
        return deep

    # -- sklearn API ----------------------------------------------------------------------------
    def fit(self, X=None, y=None):
        """Resolve the extractor settings; no image is read and no backbone is built.

        Parameters
        ----------
        X, y : ignored
            Present for the scikit-learn API: the backbone is pretrained and learns nothing from data.

        Returns
        -------
        self
        """
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r}: give a positive integer")
        self.config_, _ = self.settings().resolve(self.weights, weights_identity=self.weights_identity)
        self.fingerprint_ = self.config_.fingerprint
        self._engine = None
        return self

    def transform(self, X):
        """Features of each image.

        Parameters
        ----------
        X : sequence of paths, or uint8 array of shape (n, h, w[, 3])
            Image files (any format ``extract`` reads), or images already in memory.

        Returns
        -------
        ndarray of shape (n, n_features), float32

        Raises
        ------
        fracfeat.ImageError
            Files cannot be read or decoded (a prediction needs every row): the message names each.
        fracfeat.FracfeatError
            An image's features hold NaN or inf (``FeatureError``: the message names the images).
        fracfeat.WeightsError
            The weights are not the ones the features were made with.
        """
        check_is_fitted(self, "config_")
        kind, items = _as_images(X)
        if kind == "paths":
            feats, _, failures = self.features_of_paths(items)
            if failures:
                raise UnreadableImagesError([(os.fspath(items[i]), reason) for i, reason in failures], len(items),
                                            "fix them or leave them out (features_of_paths() skips them and says "
                                            "which)", what="DeepFeatures.transform needs every image: ")
            return feats
        batches = self.engine().iter_array_features(items, batch_size=self.batch_size, workers=self.workers)
        out = [batch.features for batch in batches]
        feats = np.concatenate(out) if out else np.empty((0, 0), np.float32)
        self._check_finite(feats, [f"image {i} of the array" for i in range(len(feats))])
        return feats

    def features_of_paths(self, paths, strict=False):
        """Features of the readable files, their positions, and ``(position, reason)`` of the others.

        Used by :func:`fracfeat.evaluate` to score a folder that holds a few damaged files.
        """
        check_is_fitted(self, "config_")
        paths = [os.fspath(p) for p in paths]
        engine = self.engine()
        feats, idx, failures = [], [], []
        for batch in engine.iter_features(paths, batch_size=self.batch_size, strict=strict, workers=self.workers):
            failures.extend(batch.failures)
            if len(batch.indices):
                feats.append(batch.features)
                idx.append(batch.indices)
        if not feats:
            return np.empty((0, 0), np.float32), np.empty(0, np.int64), failures
        feats, idx = np.concatenate(feats), np.concatenate(idx)
        self._check_finite(feats, [paths[i] for i in idx])
        return feats, idx, failures

    def _check_finite(self, feats, names) -> None:
        check_finite_rows(feats, names, what=describe_extractor(self), rows="images give NaN or inf features",
                          fix="these images cannot be scored: leave them out; if every image gives them, the "
                              "backbone's weights hold NaN or inf: extract and fit again with intact weights")

    def engine(self):
        """The feature engine, built (and its weights verified) on first use."""
        check_is_fitted(self, "config_")
        folder = self.quantized if self.config_.quantized and self.quantized else None
        if folder is not None and folder != getattr(self, "_quantized_kept", None) and \
                not str(folder).startswith(INT8_IDENTITY):
            # A folder given since (set_params on the machine a model moved to): verified, kept in the cache,
            # and the runners that could not find the model are built again.
            resolve_quantized(folder, self.config_)
            self._quantized_kept, self._engine = folder, None
        if getattr(self, "_engine", None) is None:
            weights = self.weights
            if is_keras_model(self.backbone):  # the object as it is now: trained further since fit, it is refused
                weights = model_object_weights(self.backbone, weights, self.config_.feature_layer)
            self._engine = FeatureEngine(self.config_, verified_weights(self.config_, weights))
        return self._engine

    def __getstate__(self):
        # The Keras model stays out of the pickle; it is rebuilt (and re-verified) after loading.
        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns the live __dict__
        state.pop("_engine", None)
        state.pop("_quantized_kept", None)  # verified again where the model is loaded
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.requires_fit = True
        tags.transformer_tags.preserves_dtype = []
        tags.non_deterministic = False
        return tags


def _init_signature() -> inspect.Signature:
    """``(self, backbone, weights, <the other ExtractorSettings fields>, weights_identity, batch_size, workers)``."""
    P = inspect.Parameter
    first, *rest = ExtractorSettings.options()
    own = (("weights_identity", None), ("batch_size", 32), ("workers", None))
    named = [(first.name, first.default), ("weights", "imagenet"), *((f.name, f.default) for f in rest), *own]
    return inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD),
                              *(P(name, P.POSITIONAL_OR_KEYWORD, default=default) for name, default in named)])


# scikit-learn reads an estimator's parameters off its __init__ signature (get_params, clone, set_params).
DeepFeatures.__init__.__signature__ = _init_signature()
DeepFeatures.__doc__ = DeepFeatures.__doc__.replace("{settings}", settings_doc())
_DEFAULTS = {name: p.default for name, p in list(DeepFeatures.__init__.__signature__.parameters.items())[1:]}


def _as_images(X):
    """("paths", list of str) or ("arrays", uint8 array / list of arrays), or a clear error."""
    if isinstance(X, (str, os.PathLike)):
        raise ValueError(f"DeepFeatures expects a list of image paths, got a single path {os.fspath(X)!r}; "
                         f"wrap it in a list: [{os.fspath(X)!r}]")
    if isinstance(X, np.ndarray):
        if X.dtype == np.uint8 and X.ndim in (3, 4):
            if not len(X):
                raise ValueError("DeepFeatures got no images (an empty array); give at least one image")
            return "arrays", X
        if X.dtype.kind in "UO" and (X.ndim == 1 or (X.ndim == 2 and X.shape[1] == 1)):
            X = X.ravel().tolist()
        else:
            raise ValueError(
                f"DeepFeatures expects image paths or uint8 images of shape (n, h, w[, 3]); got a {X.dtype} array of "
                f"shape {X.shape}. To use feature arrays, call pipeline[1:] instead of the whole pipeline."
            )
    try:
        items = list(X)
    except TypeError:
        raise ValueError(f"DeepFeatures expects a list of image paths, not {type(X).__name__}") from None
    if not items:
        raise ValueError("DeepFeatures got no images (an empty list); give at least one image path")
    if all(isinstance(p, (str, os.PathLike)) for p in items):
        return "paths", items
    if all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in items):
        return "arrays", items
    raise ValueError("DeepFeatures expects a list of image paths (str or pathlib.Path) or of uint8 image arrays")


class JoinedFeatures(FeatureUnion):
    """Several :class:`DeepFeatures` side by side: a FeatureUnion that reads images.

    :func:`fracfeat.fit` puts one first in the Pipeline when it tunes on joined features
    (:func:`fracfeat.join_features`, ``extract(..., join=...)``): each part makes its own store
    version's features and the rows are concatenated in the parts' order, so the Pipeline sees at
    prediction time exactly what it was trained on. It is a plain ``sklearn.pipeline.FeatureUnion``
    (same parameters, same ``transform``) with what fracfeat reads off a feature step.

    Attributes
    ----------
    fingerprint_ : str
        The parts' fingerprints joined by ``+``: equal to the joined feature set's.
    trained_on_ : dict
        Set by :func:`fracfeat.fit`: the training features' store, versions and fingerprint.
    """

    @property
    def parts(self) -> list:
        """The DeepFeatures, in order."""
        return [t for _, t in self.transformer_list]

    @property
    def fingerprint_(self) -> str:
        return "+".join(t.fingerprint_ for t in self.parts)

    def features_of_paths(self, paths, strict=False):
        """As :meth:`DeepFeatures.features_of_paths`: rows of the files every part could read."""
        paths = [os.fspath(p) for p in paths]
        results = [t.features_of_paths(paths, strict=strict) for t in self.parts]
        readable = results[0][1]
        for _, idx, _ in results[1:]:
            readable = np.intersect1d(readable, idx)
        blocks = []
        for X, idx, _ in results:
            where = {int(i): row for row, i in enumerate(idx)}
            rows = np.array([where[int(i)] for i in readable], dtype=np.int64)
            blocks.append(X[rows] if len(rows) else np.empty((0, 0), np.float32))
        failures = {}
        for _, _, part_failures in results:
            for position, reason in part_failures:
                failures.setdefault(position, reason)
        X = np.hstack(blocks).astype(np.float32, copy=False)
        return X, np.asarray(readable, np.int64), sorted(failures.items())


def feature_step(parts, weights=None):
    """A Pipeline's first step for features made of ``parts`` (:attr:`FeatureSet.parts`): a DeepFeatures
    for one part, a JoinedFeatures of one per part for joined features; each makes its part's features
    from the image exactly as its store version holds them."""
    extractors = [DeepFeatures.from_provenance(part.provenance, weights=weights) for part in parts]
    if len(extractors) == 1:
        return extractors[0]
    return JoinedFeatures([(f"part{i}", d) for i, d in enumerate(extractors, 1)])


def feature_parts(step) -> list:
    """The DeepFeatures of a feature step (one, or a JoinedFeatures' parts)."""
    return step.parts if isinstance(step, JoinedFeatures) else [step]


def describe_extractor(step) -> str:
    """``vgg16 224px avg`` (``+`` between the parts of joined features)."""
    return " + ".join(f"{d.config_.backbone} {d.config_.image_size}px {d.config_.pooling}"
                      for d in feature_parts(step))
