"""Registry of backbones: name -> Keras constructor, preprocessing, sizes, and weights resolution.

Nothing here imports Keras at module import time.
"""

from __future__ import annotations

import difflib

import logging
import os
import sys
import uuid
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
    preprocessing: str  # one of PREPROCESSINGS
    imagenet_file: str = ""  # Keras' cache file name for the no-top ImageNet weights ("": not known here)
    imagenet_origin: str = ""
    imagenet_md5: str = ""
    # Keras adds layers (EfficientNet's ImageNet std rescaling) only for weights="imagenet".
    imagenet_changes_graph: bool = False
    # Intermediate layers whose pooled outputs ``layers=`` may add to the final ones: the end of each
    # stage before the last, shallow to deep (Keras' own layer names; checked in tests/test_backbones.py).
    tap_layers: tuple = ()
    width: int = 0  # channels of the last convolution map: the features' width with avg/max pooling
    # The "auto" precision/runtime table (_hardware) holds a measured row for it; others run on Keras.
    runtime_measured: bool = False


# The input preprocessing modes, applied inside the feature graph to uint8 RGB (fracfeat._runtimes).
# The first three are keras.applications.imagenet_utils' modes (tests compare each backbone with its
# own preprocess_input); a user's own model declares one of them.
PREPROCESSINGS = {
    "caffe": "RGB->BGR, ImageNet channel means subtracted, 0-255 scale (VGG, ResNet)",
    "tf": "scaled to [-1, 1] (Inception, Xception, MobileNet/V2, NASNet, ResNetV2)",
    "torch": "scaled to [0, 1], then ImageNet mean/std per channel (DenseNet)",
    "raw-0-255": "0..255 as is: the model normalises inside (EfficientNet/V2, ConvNeXt, MobileNetV3)",
    "scale-0-1": "scaled to [0, 1]",
}

_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications"

# The three backbones fracfeat started with: their measured runtimes, ImageNet files and tap layers.
_MEASURED = (
    BackboneSpec(
        "vgg16", "vgg16", "VGG16", 224, 32, "caffe",
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
        tap_layers=("block1_pool", "block2_pool", "block3_pool", "block4_pool"), width=512, runtime_measured=True,
    ),
    BackboneSpec(
        "resnet50", "resnet50", "ResNet50", 224, 32, "caffe",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
        tap_layers=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out"), width=2048, runtime_measured=True,
    ),
    BackboneSpec(
        "efficientnetb2", "efficientnet", "EfficientNetB2", 260, 32, "raw-0-255",
        "efficientnetb2_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb2_notop.h5",
        "111f8e2ac8aa800a7a99e3239f7bfb39",
        imagenet_changes_graph=True,
        tap_layers=("block2c_add", "block3c_add", "block4d_add", "block5d_add", "block6e_add"), width=1408,
        runtime_measured=True,
    ),
)

# Every other keras.applications CNN: (constructor, module, default size, minimum size, preprocessing,
# width). Sizes are the arguments each constructor gives imagenet_utils.obtain_input_shape and the
# preprocessing is what its module's preprocess_input does: tests/test_backbones.py reads both from the
# installed Keras (keras_facts) and builds them (one of each architecture; all 40 with
# FRACFEAT_TEST_EVERY_BACKBONE=1), so a Keras that changes them fails there. They
# are written out because reading them at run time would import TensorFlow (6 s) in every settings
# check, fit on stored features included. The widths are the built models' last channels.
_KERAS_CNNS = (
    ("VGG19", "vgg19", 224, 32, "caffe", 512),
    ("ResNet101", "resnet", 224, 32, "caffe", 2048),
    ("ResNet152", "resnet", 224, 32, "caffe", 2048),
    ("ResNet50V2", "resnet_v2", 224, 32, "tf", 2048),
    ("ResNet101V2", "resnet_v2", 224, 32, "tf", 2048),
    ("ResNet152V2", "resnet_v2", 224, 32, "tf", 2048),
    ("DenseNet121", "densenet", 224, 32, "torch", 1024),
    ("DenseNet169", "densenet", 224, 32, "torch", 1664),
    ("DenseNet201", "densenet", 224, 32, "torch", 1920),
    ("EfficientNetB0", "efficientnet", 224, 32, "raw-0-255", 1280),
    ("EfficientNetB1", "efficientnet", 240, 32, "raw-0-255", 1280),
    ("EfficientNetB3", "efficientnet", 300, 32, "raw-0-255", 1536),
    ("EfficientNetB4", "efficientnet", 380, 32, "raw-0-255", 1792),
    ("EfficientNetB5", "efficientnet", 456, 32, "raw-0-255", 2048),
    ("EfficientNetB6", "efficientnet", 528, 32, "raw-0-255", 2304),
    ("EfficientNetB7", "efficientnet", 600, 32, "raw-0-255", 2560),
    ("EfficientNetV2B0", "efficientnet_v2", 224, 32, "raw-0-255", 1280),
    ("EfficientNetV2B1", "efficientnet_v2", 240, 32, "raw-0-255", 1280),
    ("EfficientNetV2B2", "efficientnet_v2", 260, 32, "raw-0-255", 1408),
    ("EfficientNetV2B3", "efficientnet_v2", 300, 32, "raw-0-255", 1536),
    ("EfficientNetV2S", "efficientnet_v2", 384, 32, "raw-0-255", 1280),
    ("EfficientNetV2M", "efficientnet_v2", 480, 32, "raw-0-255", 1280),
    ("EfficientNetV2L", "efficientnet_v2", 480, 32, "raw-0-255", 1280),
    ("ConvNeXtTiny", "convnext", 224, 32, "raw-0-255", 768),
    ("ConvNeXtSmall", "convnext", 224, 32, "raw-0-255", 768),
    ("ConvNeXtBase", "convnext", 224, 32, "raw-0-255", 1024),
    ("ConvNeXtLarge", "convnext", 224, 32, "raw-0-255", 1536),
    ("ConvNeXtXLarge", "convnext", 224, 32, "raw-0-255", 2048),
    ("MobileNet", "mobilenet", 224, 32, "tf", 1024),
    ("MobileNetV2", "mobilenet_v2", 224, 32, "tf", 1280),
    ("MobileNetV3Small", "mobilenet_v3", 224, 32, "raw-0-255", 576),
    ("MobileNetV3Large", "mobilenet_v3", 224, 32, "raw-0-255", 960),
    ("InceptionV3", "inception_v3", 299, 75, "tf", 2048),
    ("InceptionResNetV2", "inception_resnet_v2", 299, 75, "tf", 1536),
    ("Xception", "xception", 299, 71, "tf", 2048),
    ("NASNetMobile", "nasnet", 224, 32, "tf", 1056),
    ("NASNetLarge", "nasnet", 331, 32, "tf", 4032),
)

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in _MEASURED}
BACKBONES.update({c.lower(): BackboneSpec(c.lower(), module, c, default, low, pre, width=width,
                                          imagenet_changes_graph=module == "efficientnet")
                  for c, module, default, low, pre, width in _KERAS_CNNS})

# A user's own model: backbone="keras" with weights="<file>.keras" (architecture and weights in one
# file), its feature layer and preprocessing declared by the user (ExtractorSettings.feature_layer,
# .preprocessing). Its input size is the user's image_size.
USER_MODEL = BackboneSpec("keras", "", "", 224, 32, "")

# Caffe-style ImageNet channel means, in BGR order (keras.applications.imagenet_utils).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# Torch-style ImageNet mean and std of [0, 1] RGB (keras.applications.imagenet_utils).
TORCH_MEAN_RGB, TORCH_STD_RGB = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def backbone_spec(name) -> BackboneSpec:
    if is_keras_model(name):
        return USER_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise ConfigError(f"backbone= got a {type(name).__module__}.{type(name).__qualname__}, which is not a Keras "
                          f"model: pass a keras.Model object (keras.Model(inputs, outputs), keras.applications.*), "
                          f"a backbone name (`fracfeat backbones` lists them), or 'keras' with weights='<file>.keras'")
    key = os.fspath(name).lower().replace("-", "").replace("_", "")
    if key == USER_MODEL.name:
        return USER_MODEL
    if key not in BACKBONES:
        hint = " (a .keras file is given as backbone='keras', weights=<the file>)" if key.endswith(".keras") else ""
        close = difflib.get_close_matches(key, BACKBONES, n=3, cutoff=0.6)
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown backbone {name!r}{hint}: {guess}`fracfeat backbones` lists the {len(BACKBONES)} "
                          f"there are (vgg16, resnet50, efficientnetb2, densenet121, ...), or 'keras' for your own "
                          f"model (weights='<file>.keras', feature_layer=, preprocessing=)")
    return BACKBONES[key]


def resolve_preprocessing(spec: BackboneSpec, preprocessing: str | None) -> str:
    """The input preprocessing: the backbone's own for "auto"; a user's own model must declare one."""
    p = "auto" if preprocessing is None else str(preprocessing).lower()
    if p == "auto" and spec is USER_MODEL:
        raise ConfigError(f"backbone='keras' needs its input preprocessing declared: pass preprocessing= one of "
                          f"{', '.join(PREPROCESSINGS)} (what the model was trained on)")
    if p == "auto":
        return spec.preprocessing
    if p not in PREPROCESSINGS:
        raise ConfigError(f"preprocessing={preprocessing!r}: choose one of auto, {', '.join(PREPROCESSINGS)}")
    return p


def check_feature_layer(spec: BackboneSpec, feature_layer: str | None) -> str:
    """A user model's feature layer ("": its output); other backbones are tapped with ``layers=``."""
    name = "" if feature_layer is None else feature_layer
    if not isinstance(name, str):
        raise ConfigError(f"feature_layer={feature_layer!r}: give a layer name of your model")
    if name and spec is not USER_MODEL:
        raise ConfigError(f"feature_layer={feature_layer!r} is for backbone='keras' (your own model); {spec.name}'s "
                          f"intermediate layers are added with layers= ({', '.join(spec.tap_layers) or 'none'})")
    return name


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
    word = weights.lower() if isinstance(weights, str) else None
    if spec is USER_MODEL and (weights is None or word in ("none", "random", "imagenet")):
        raise ConfigError(f"backbone='keras' takes your model from weights=: pass weights='<file>.keras' (a model "
                          f"saved with model.save), not {weights!r}")
    if weights is None or word in ("none", "random"):
        # Seeded pointwise kernels came later: Xception's and NASNet's rows made before then had Keras' own unseeded
        # ones (other numbers in every process), so theirs is another identity, and no such row is reused.
        pointwise = "+pointwise" if spec.keras_module in SEPARABLE_MODULES else ""
        return ResolvedWeights("random", None, f"random:he-normal:seed=0{pointwise}")
    if word == "imagenet" and not spec.imagenet_file:
        raise WeightsError(
            f"fracfeat does not fetch ImageNet weights for {spec.name} itself: save them once where Keras can "
            f"download them (keras.applications.{spec.keras_constructor}(include_top=False, weights='imagenet')"
            f".save_weights('{spec.name}.weights.h5')) and pass weights='{spec.name}.weights.h5'"
        )
    if word == "imagenet":
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


# keras.applications modules with SeparableConv2D layers (a depthwise and a pointwise kernel each).
SEPARABLE_MODULES = ("xception", "nasnet")


def seeded_random_weights(model, seed: int = 0) -> None:
    """Deterministic He-normal kernels (Keras' own init draws from a global seed state)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.path.rsplit("/", 1)[-1]
        if name in ("kernel", "depthwise_kernel", "pointwise_kernel"):  # every variable Keras draws at random
            shape = tuple(var.shape)
            fan_in = int(np.prod(shape[:-2])) if name == "depthwise_kernel" else int(np.prod(shape[:-1]))
            values = rng.standard_normal(shape).astype("float32") * np.float32(np.sqrt(2.0 / max(fan_in, 1)))
            var.assign(values)


def build_backbone(spec: BackboneSpec, image_size: int, weights: ResolvedWeights, feature_layer: str = ""):
    """The Keras application without its top, for ``image_size`` x ``image_size`` RGB input (or a user's
    own model, cut at ``feature_layer``)."""
    import importlib

    require_keras()
    if spec is USER_MODEL:
        return load_user_model(weights.path, image_size, feature_layer, weights.identity)
    # keras.applications itself: some modules (mobilenet_v3) do not export their constructors.
    constructor = getattr(importlib.import_module("keras.applications"), spec.keras_constructor)
    shape = (image_size, image_size, 3)
    if weights.kind == "imagenet" and spec.imagenet_changes_graph:
        # Keras' cache already holds the verified file, so this loads without a download.
        return constructor(include_top=False, weights="imagenet", input_shape=shape)
    model = constructor(include_top=False, weights=None, input_shape=shape)
    if weights.kind == "random":
        seeded_random_weights(model)
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


def load_user_model(path: str, image_size: int, feature_layer: str = "", identity: str = ""):
    """A user's ``.keras`` model, cut at ``feature_layer`` (its output when ""), checked to take
    ``image_size`` px RGB; a model object's file (``identity`` a MODEL_IDENTITY) checked to hold that model."""
    keras = require_keras()
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # a damaged zip, a weights-only file, an unknown custom layer...
        raise WeightsError(f"cannot load {path!r} as a Keras model ({type(e).__name__}: {str(e)[:200]}); pass a "
                           f"model saved with model.save('<file>.keras')") from None
    if identity.startswith(MODEL_IDENTITY) and model_identity(model) != identity:
        raise WeightsError(f"{path!r} holds another model ({model_identity(model)}) than the one these features were "
                           f"made with ({identity}): pass a .keras file of that model, e.g. "
                           f"pipeline.set_params(features__weights='/path/to/model.keras')")
    shape = tuple(model.input_shape) if not isinstance(model.input_shape, list) else ()
    if len(shape) != 4 or shape[-1] != 3:
        raise WeightsError(f"{path!r} takes inputs of shape {model.input_shape}; fracfeat feeds (n, side, side, 3) "
                           f"RGB: pass a model with one image input of 3 channels")
    if shape[1] not in (None, image_size) or shape[2] not in (None, image_size):
        raise ConfigError(f"{path!r} takes {shape[1]}x{shape[2]} px images: pass image_size={shape[1]}")
    if not feature_layer:
        return model
    layer = feature_layer_of(model, feature_layer, repr(path))
    return keras.Model(model.inputs, layer.output, name=f"{model.name}_to_{feature_layer}")


def feature_layer_of(model, feature_layer: str, what: str):
    """``model``'s layer ``feature_layer``, or a ConfigError naming its last layers (``what``: the model, in words)."""
    try:
        return model.get_layer(feature_layer)
    except ValueError:
        names = [lay.name for lay in model.layers][-8:]
        raise ConfigError(f"feature_layer={feature_layer!r} is not a layer of {what}; its last layers are "
                          f"{', '.join(names)}") from None


# A Keras model object given as backbone=: its identity is the sha256 of its architecture and weight values, since
# a .keras file's bytes change at every save (the zip holds the save date), and fracfeat keeps it as a .keras file
# named by that identity (content-addressed, under the cache folder) that store provenance and saved Pipelines name,
# verified by the same identity when it is loaded: any save of the same model verifies.
MODEL_IDENTITY = "keras-model:sha256:"


def is_keras_model(obj) -> bool:
    """Whether ``obj`` is a Keras model object (never imports Keras: without it loaded, nothing is one)."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, getattr(keras, "Model", ()))


def _without_trainable(value):
    # Freezing layers changes no feature (fracfeat runs models with training=False), so it keeps the identity.
    if isinstance(value, dict):
        return {k: _without_trainable(v) for k, v in value.items() if k != "trainable"}
    if isinstance(value, (list, tuple)):
        return [_without_trainable(v) for v in value]
    return value


def model_identity(model) -> str:
    """``keras-model:sha256:<hex>`` of ``model``'s class, architecture config and weight values, in order.

    Equal for the object, for any ``.keras`` file it is saved to, and for that file loaded in another process.
    Weights are taken in ``model.weights`` order without their paths (a Sequential's differ after loading).
    """
    import hashlib
    import json

    import numpy as np

    keras = require_keras()
    try:
        config = model.get_config()
    except Exception as e:  # a subclassed model without get_config
        raise ConfigError(f"backbone={model.name!r} cannot describe its architecture ({type(e).__name__}: {e}); "
                          f"give it a get_config, or build it as keras.Model(inputs, outputs)") from None
    h = hashlib.sha256()
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    h.update(json.dumps({"class": kind, "config": _without_trainable(config)}, sort_keys=True, default=str).encode())
    for var in model.weights:
        values = np.ascontiguousarray(keras.ops.convert_to_numpy(var))
        h.update(f"|{values.dtype.str}{values.shape}|".encode())
        h.update(values.tobytes())
    return MODEL_IDENTITY + h.hexdigest()


def model_object_weights(model, weights, feature_layer: str = "") -> ResolvedWeights:
    """A Keras model object as weights: its identity and the content-addressed ``.keras`` file fracfeat keeps of
    it (saved once, atomically, under ``<cache folder>/models``), its feature layer checked first."""
    if not (weights is None or (isinstance(weights, str) and weights.lower() in ("imagenet", "none", "random"))):
        raise ConfigError(f"backbone={model.name!r} is a Keras model object and carries its own weights: leave "
                          f"weights= out (got {weights!r}), or pass backbone='keras', weights='<file>.keras'")
    if feature_layer:
        feature_layer_of(model, feature_layer, f"your model {model.name!r}")
    identity = model_identity(model)
    from ._runtimes import cache_dir  # _runtimes imports this module

    path = cache_dir() / "models" / f"{identity.rsplit(':', 1)[-1]}.keras"
    if not path.is_file():
        tmp = path.with_name(f".{uuid.uuid4().hex}.keras")  # Keras saves only to a name ending in .keras
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            model.save(tmp)
            os.replace(tmp, path)  # atomic: a reader sees the whole file or none
        except OSError as e:
            raise WeightsError(f"cannot keep your model as {str(path)!r} ({e}): set FRACFEAT_CACHE_DIR to a writable "
                               f"folder") from None
        except Exception as e:  # a custom layer Keras cannot serialize
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"backbone={model.name!r} cannot be saved as a .keras file ({type(e).__name__}: "
                              f"{str(e)[:200]}), which a saved Pipeline rebuilds it from: register its custom layers "
                              f"(keras.saving.register_keras_serializable)") from None
    return ResolvedWeights("model", str(path), identity)


def kept_model_file(weights, identity: str) -> ResolvedWeights:
    """The ``.keras`` file of a model object (``identity`` a MODEL_IDENTITY), its content verified when loaded."""
    path = Path(os.fspath(weights)).expanduser() if isinstance(weights, (str, os.PathLike)) else None
    if path is None or not path.is_file():
        raise WeightsError(f"the Keras model these features were made with ({identity[:31]}...) was kept as "
                           f"{str(path or weights)!r}, which is not there: save that model (model.save('model.keras')) "
                           f"and pass it, e.g. pipeline.set_params(features__weights='model.keras')")
    return ResolvedWeights("model", str(path.resolve()), identity)


def keras_facts(constructor: str) -> dict:
    """What the installed Keras says of ``keras.applications.<constructor>`` without building it: the
    default and minimum sizes it gives ``imagenet_utils.obtain_input_shape``, and its module's
    ``preprocess_input`` mode (one of PREPROCESSINGS, found by running it on one known pixel)."""
    import importlib

    import numpy as np

    keras = require_keras()
    from keras.src.applications import imagenet_utils

    class _Seen(Exception):
        pass

    seen = {}

    def spy(input_shape, default_size, min_size, *args, **kwargs):
        seen.update(default_size=default_size, min_size=min_size)
        raise _Seen

    fn = getattr(keras.applications, constructor)
    real, imagenet_utils.obtain_input_shape = imagenet_utils.obtain_input_shape, spy
    try:
        fn(include_top=False, weights=None)
    except _Seen:
        pass
    finally:
        imagenet_utils.obtain_input_shape = real
    module = importlib.import_module(fn.__module__)
    pixel = np.array([[[[10.0, 100.0, 200.0]]]], "float32")
    out = np.asarray(module.preprocess_input(pixel.copy())).ravel()
    unit = pixel.ravel() / 255.0
    modes = {"raw-0-255": pixel.ravel(), "tf": pixel.ravel() / 127.5 - 1.0,
             "caffe": pixel.ravel()[::-1] - np.array(CAFFE_MEAN_BGR),
             "torch": (unit - np.array(TORCH_MEAN_RGB)) / np.array(TORCH_STD_RGB), "scale-0-1": unit}
    seen["preprocessing"] = next((m for m, v in modes.items() if np.allclose(out, v, atol=1e-4)), "unknown")
    seen["keras_module"] = fn.__module__.rsplit(".", 1)[-1]
    return seen



def backbone_table() -> list[dict]:
    """One row per registered backbone: name, Keras constructor, feature width (avg/max pooling), default
    and minimum input size, preprocessing, and whether fracfeat fetches its ImageNet weights itself."""
    return [{"name": s.name, "keras": f"keras.applications.{s.keras_constructor}", "width": s.width,
             "default_size": s.default_size, "min_size": s.min_size, "preprocessing": s.preprocessing,
             "imagenet_download": bool(s.imagenet_file)} for s in BACKBONES.values()]
