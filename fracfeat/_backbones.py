"""Registry of backbones: name -> Keras constructor, preprocessing, sizes, and weights resolution.

Nothing here imports Keras at module import time.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ._deps import require, require_keras
from ._errors import ConfigError, WeightsError
from ._images import sha256_of_file

log = logging.getLogger("fracfeat")

POOLINGS = ("avg", "max", "none")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    keras_module: str  # keras.applications.<module>
    keras_constructor: str
    default_size: int
    min_size: int
    preprocessing: str  # "caffe" (RGB->BGR, ImageNet mean subtraction) or "raw-0-255"
    imagenet_file: str  # Keras' cache file name for the no-top ImageNet weights
    imagenet_origin: str
    imagenet_md5: str
    # Keras adds layers (EfficientNet's ImageNet std rescaling) only for weights="imagenet".
    imagenet_changes_graph: bool = False
    # Intermediate layers whose pooled outputs ``layers=`` may add to the final ones: the end of each
    # stage before the last, shallow to deep (Keras' own layer names; checked in tests/test_backbones.py).
    tap_layers: tuple = ()


_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications"

BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(
        "vgg16", "vgg16", "VGG16", 224, 32, "caffe",
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
        tap_layers=("block1_pool", "block2_pool", "block3_pool", "block4_pool"),
    ),
    "resnet50": BackboneSpec(
        "resnet50", "resnet50", "ResNet50", 224, 32, "caffe",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
        tap_layers=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
    ),
    "efficientnetb2": BackboneSpec(
        "efficientnetb2", "efficientnet", "EfficientNetB2", 260, 32, "raw-0-255",
        "efficientnetb2_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb2_notop.h5",
        "111f8e2ac8aa800a7a99e3239f7bfb39",
        imagenet_changes_graph=True,
        tap_layers=("block2c_add", "block3c_add", "block4d_add", "block5d_add", "block6e_add"),
    ),
}

# Caffe-style ImageNet channel means, in BGR order (keras.applications.imagenet_utils).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def backbone_spec(name: str) -> BackboneSpec:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[key]


def resolve_image_size(spec: BackboneSpec, image_size: int | None) -> int:
    if image_size is None:
        return spec.default_size
    try:
        size = int(image_size)
    except (TypeError, ValueError):
        size = None
    if size is None or size != image_size:  # 32.5 is not "below the minimum", it is not a pixel count
        raise ConfigError(f"image_size must be an integer number of pixels, not {image_size!r}")
    if size < spec.min_size:
        raise ConfigError(
            f"image_size={image_size!r} is below {spec.name}'s minimum of {spec.min_size} pixels "
            f"(its default is {spec.default_size}); pass image_size >= {spec.min_size}"
        )
    return size


def resolve_pooling(pooling: str | None) -> str:
    p = "none" if pooling is None else str(pooling).lower()
    if p not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
    return p


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights come from and a stable identity for the fingerprint."""

    kind: str  # "imagenet" | "file" | "random"
    path: str | None
    identity: str  # e.g. "file:sha256:..." or "random:he-normal:seed=0"


def resolve_weights(spec: BackboneSpec, weights) -> ResolvedWeights:
    """Turn the user's ``weights`` into a file path (or None) and an identity.

    ``"imagenet"`` goes through Keras' own download cache (``~/.keras/models``), verified by Keras'
    md5, and its identity is the sha256 of the cached file.
    """
    if weights is None or (isinstance(weights, str) and weights.lower() in ("none", "random")):
        return ResolvedWeights("random", None, "random:he-normal:seed=0")
    if isinstance(weights, str) and weights.lower() == "imagenet":
        keras = require("keras", why="weights='imagenet'")
        try:
            path = keras.utils.get_file(
                spec.imagenet_file, spec.imagenet_origin, cache_subdir="models", file_hash=spec.imagenet_md5
            )
        except Exception as e:  # network errors come in many types
            raise WeightsError(
                f"could not get Keras' ImageNet weights for {spec.name} ({type(e).__name__}: {e}). "
                f"Offline? Put the file at ~/.keras/models/{spec.imagenet_file}, or pass weights='/path/to/weights.h5'."
            ) from None
        return ResolvedWeights("imagenet", path, f"imagenet:sha256:{sha256_of_file(path, float('inf'))}")
    path = Path(os.fspath(weights)).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} not found: pass an existing Keras weights file, 'imagenet', or None"
        )
    return ResolvedWeights("file", str(path.resolve()), f"file:sha256:{sha256_of_file(str(path), float('inf'))}")


def _seeded_random_weights(model, seed: int = 0) -> None:
    """Deterministic He-normal kernels (Keras' own init draws from a global seed state)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.path.rsplit("/", 1)[-1]
        if name in ("kernel", "depthwise_kernel"):
            shape = tuple(var.shape)
            fan_in = int(np.prod(shape[:-1])) if name == "kernel" else int(np.prod(shape[:-2]))
            values = rng.standard_normal(shape).astype("float32") * np.float32(np.sqrt(2.0 / max(fan_in, 1)))
            var.assign(values)


def build_backbone(spec: BackboneSpec, image_size: int, weights: ResolvedWeights):
    """The Keras application without its top, for ``image_size`` x ``image_size`` RGB input."""
    import importlib

    require_keras()
    module = importlib.import_module(f"keras.applications.{spec.keras_module}")
    constructor = getattr(module, spec.keras_constructor)
    shape = (image_size, image_size, 3)
    if weights.kind == "imagenet" and spec.imagenet_changes_graph:
        # Keras' cache already holds the verified file, so this loads without a download.
        return constructor(include_top=False, weights="imagenet", input_shape=shape)
    model = constructor(include_top=False, weights=None, input_shape=shape)
    if weights.kind == "random":
        _seeded_random_weights(model)
    else:
        _load_weights_file(model, spec, weights.path)
    return model


def _load_weights_file(model, spec: BackboneSpec, path: str) -> None:
    """``model.load_weights``, with Keras' per-layer UserWarnings turned into one message of ours."""
    hint = f"pass the no-top weights of {spec.keras_constructor}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            model.load_weights(path)
        except Exception as e:  # the ~100 warnings Keras gave before giving up only repeat the reason
            raise WeightsError(f"weights file {path!r} does not fit {spec.name} without its top "
                               f"({type(e).__name__}: {e}); {hint}") from None
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if said:
        # Keras loaded the file in spite of them; its own words: skipped layers keep their random weights.
        log.warning("weights file %r may not fit %s: Keras warned %d times while loading it (the first: %s); "
                    "features from layers it skipped would be wrong: %s", path, spec.name, len(said), said[0], hint)
