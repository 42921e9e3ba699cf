"""Batches of image files -> feature rows, as fast as the hardware allows.

The one code path every feature goes through: ``extract`` (into the store) and ``DeepFeatures``
(inside a fitted Pipeline) both call :meth:`FeatureEngine.iter_features`.

The engine knows nothing of HDF5. Decoding runs in a thread pool ahead of the model (Pillow and
TensorFlow both release the GIL), so the CPU decodes the next batch while the backbone runs.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ._backbones import CAFFE_MEAN_BGR, BackboneSpec, ResolvedWeights, backbone_spec, build_backbone, resolve_weights
from ._config import ExtractorConfig, validate_settings
from ._errors import ImageError
from ._images import DecodedImage, load_image

log = logging.getLogger("fracfeat")


def has_gpu() -> bool:
    """True when TensorFlow sees a GPU (imports TensorFlow)."""
    try:
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:
        return False


def choose_precision_and_runtime(spec: BackboneSpec, precision: str, runtime: str) -> tuple[str, str]:
    """Resolve "auto" to the fastest correct path for this backbone on this hardware."""
    if runtime == "auto":
        runtime = "keras"
    if precision == "auto":
        precision = "float32"
    return precision, runtime


def resolve_extractor(
    backbone="vgg16", weights="imagenet", image_size=None, pooling="avg",
    precision="auto", runtime="auto", truncated="read",
) -> tuple[ExtractorConfig, ResolvedWeights]:
    spec, size, pool, prec, rt, tr = validate_settings(backbone, image_size, pooling, precision, runtime, truncated)
    resolved = resolve_weights(spec, weights)
    prec, rt = choose_precision_and_runtime(spec, prec, rt)
    config = ExtractorConfig(
        backbone=spec.name, image_size=size, pooling=pool, preprocessing=spec.preprocessing,
        weights=resolved.identity, precision=prec, runtime=rt, truncated=tr,
    )
    return config, resolved


def _build_feature_model(config: ExtractorConfig, weights: ResolvedWeights):
    """uint8 (n, s, s, 3) RGB -> float32 (n, d) features, preprocessing inside the graph."""
    from ._deps import require_keras

    keras = require_keras()
    from keras import layers, ops

    spec = backbone_spec(config.backbone)
    policy_before = keras.config.dtype_policy()
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[config.precision]
    keras.config.set_dtype_policy(policy)
    try:
        backbone = build_backbone(spec, config.image_size, weights)
        inputs = keras.Input((config.image_size, config.image_size, 3), dtype="uint8", name="rgb_uint8")
        x = ops.cast(inputs, "float32")
        if config.preprocessing == "caffe":
            x = ops.flip(x, axis=-1) - ops.convert_to_tensor(np.array(CAFFE_MEAN_BGR, dtype="float32"))
        x = backbone(x, training=False)
        if config.pooling == "avg":
            x = layers.GlobalAveragePooling2D(dtype="float32")(x)
        elif config.pooling == "max":
            x = layers.GlobalMaxPooling2D(dtype="float32")(x)
        else:
            x = layers.Flatten(dtype="float32")(x)
        x = ops.cast(x, "float32")
        return keras.Model(inputs, x, name=f"fracfeat_{spec.name}")
    finally:
        keras.config.set_dtype_policy(policy_before)


class KerasRunner:
    """Runs the feature model with one compiled graph call per batch (no ``predict`` overhead)."""

    def __init__(self, model):
        import keras

        self.model = model
        self._fn = None
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            s = model.input_shape[1]
            self._fn = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8)],
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._fn is not None:
            return self._fn(batch).numpy()
        return np.asarray(self.model(batch, training=False))


@dataclass
class FeatureBatch:
    """Features for ``indices`` (positions in the input list), plus files that failed."""

    indices: np.ndarray
    features: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)


class FeatureEngine:
    """A lazily built feature model plus the decode pipeline feeding it."""

    def __init__(self, config: ExtractorConfig, weights: ResolvedWeights):
        self.config = config
        self.weights = weights
        self._runner = None

    @property
    def runner(self):
        if self._runner is None:
            model = _build_feature_model(self.config, self.weights)
            self._runner = KerasRunner(model)
        return self._runner

    @property
    def n_features(self) -> int:
        return int(self.runner.model.output_shape[-1])

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Features of already decoded uint8 images, shape (n, s, s, 3)."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        out = self.runner(batch)
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)

    def iter_decoded(self, paths: Sequence[str], workers: int | None = None, lookahead: int = 64) -> Iterator[tuple[int, DecodedImage]]:
        """Decode files in a thread pool, yielding results in input order."""
        size, policy = self.config.image_size, self.config.truncated
        workers = workers or min(8, (os.cpu_count() or 1) + 1)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fracfeat-decode") as pool:
            pending: deque = deque()
            it = iter(enumerate(paths))
            for i, p in it:
                pending.append((i, pool.submit(load_image, p, size, policy)))
                if len(pending) >= lookahead:
                    break
            while pending:
                i, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(load_image, nxt[1], size, policy)))
                yield i, fut.result()

    def iter_features(
        self, paths: Sequence[str], batch_size: int = 32, strict: bool = False, workers: int | None = None,
    ) -> Iterator[FeatureBatch]:
        """Yield a :class:`FeatureBatch` per ``batch_size`` decoded images, in input order."""
        size = self.config.image_size
        buf = np.empty((batch_size, size, size, 3), dtype=np.uint8)
        idx: list[int] = []
        failures: list[tuple[int, str]] = []
        truncated: list[int] = []
        for i, decoded in self.iter_decoded(paths, workers=workers, lookahead=max(2 * batch_size, 16)):
            if decoded.pixels is None:
                if strict:
                    raise ImageError(f"{paths[i]}: {decoded.error} (strict=True stops at the first bad file; "
                                     f"pass strict=False to record it as a failure and go on)")
                failures.append((i, decoded.error))
                continue
            if decoded.truncated:
                truncated.append(i)
            buf[len(idx)] = decoded.pixels
            idx.append(i)
            if len(idx) == batch_size:
                yield FeatureBatch(np.array(idx), self.forward(buf), failures, truncated)
                idx, failures, truncated = [], [], []
        if idx or failures:
            feats = self.forward(buf[: len(idx)]) if idx else np.empty((0, 0), np.float32)
            yield FeatureBatch(np.array(idx, dtype=np.int64), feats, failures, truncated)
