"""The feature model and the runtimes that run it: Keras (TensorFlow graph) and OpenVINO (compiled, cached).

A runner takes uint8 (n, s, s, 3) RGB and returns float32 (n, d) features; :func:`build_runner` picks
the one an extractor config names. Nothing here knows how images are decoded or batched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._backbones import CAFFE_MEAN_BGR, TORCH_MEAN_RGB, TORCH_STD_RGB, ResolvedWeights, backbone_spec, build_backbone
from ._config import ExtractorConfig
from ._deps import require, require_keras
from ._errors import WeightsError
from ._hardware import keras_chunk_size
from ._images import sha256_of_file

log = logging.getLogger("fracfeat")


def build_feature_model(config: ExtractorConfig, weights: ResolvedWeights):
    """uint8 (n, s, s, 3) RGB -> float32 (n, d) features, preprocessing inside the graph."""
    keras = require_keras()
    from keras import layers, ops

    spec = backbone_spec(config.backbone)
    policy_before = keras.config.dtype_policy()
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[config.precision]
    keras.config.set_dtype_policy(policy)
    try:
        backbone = build_backbone(spec, config.image_size, weights, config.feature_layer)
        inputs = keras.Input((config.image_size, config.image_size, 3), dtype="uint8", name="rgb_uint8")
        x = preprocess_in_graph(ops, ops.cast(inputs, "float32"), config.preprocessing)
        if config.layers:
            x = _pooled_taps(keras, backbone, config)(x, training=False)
        else:
            x = backbone(x, training=False)
            # A user's model cut at a layer that already gives one vector per image (a dense layer) is not pooled.
            x = _pool(layers, config.pooling)(x) if len(x.shape) > 2 else x
        x = ops.cast(x, "float32")
        return keras.Model(inputs, x, name=f"fracfeat_{spec.name}")
    finally:
        keras.config.set_dtype_policy(policy_before)


def preprocess_in_graph(ops, x, preprocessing: str):
    """float32 RGB 0..255 -> the backbone's input (PREPROCESSINGS in fracfeat._backbones)."""
    if preprocessing == "caffe":
        return ops.flip(x, axis=-1) - ops.convert_to_tensor(np.array(CAFFE_MEAN_BGR, dtype="float32"))
    if preprocessing == "tf":
        return x / 127.5 - 1.0
    if preprocessing == "torch":
        mean, std = (ops.convert_to_tensor(np.array(v, dtype="float32")) for v in (TORCH_MEAN_RGB, TORCH_STD_RGB))
        return (x / 255.0 - mean) / std
    if preprocessing == "scale-0-1":
        return x / 255.0
    return x  # raw-0-255


def _pool(layers, pooling: str, name: str | None = None):
    """The global pooling layer, in float32 whatever the dtype policy (features are float32 everywhere)."""
    kind = {"avg": layers.GlobalAveragePooling2D, "max": layers.GlobalMaxPooling2D, "none": layers.Flatten}[pooling]
    return kind(dtype="float32", name=name)


def _pooled_taps(keras, backbone, config: ExtractorConfig):
    """The backbone with ``config.layers`` tapped: each named output and the final one pooled, concatenated.

    One functional model over the backbone's own layers (weights shared, nothing copied), so every
    runtime that takes the Keras model (OpenVINO converts this very graph) gets the taps for free.
    """
    from keras import layers

    maps = [backbone.get_layer(name).output for name in config.layers] + [backbone.output]
    names = [*config.layers, "final"]
    pooled = [_pool(layers, config.pooling, name=f"pool_{n}")(m) for n, m in zip(names, maps)]
    out = layers.Concatenate(dtype="float32", name="taps")(pooled)
    return keras.Model(backbone.input, out, name=f"{backbone.name}_taps")


def keras_versions() -> dict:
    """Keras, its backend and TensorFlow versions (imports Keras)."""
    keras = require("keras")

    versions = {"keras_version": keras.__version__, "keras_backend": keras.backend.backend(), "tensorflow_version": ""}
    if "tensorflow" in sys.modules:
        versions["tensorflow_version"] = sys.modules["tensorflow"].__version__
    return versions


class KerasRunner:
    """Runs the feature model with one compiled graph call per chunk of ``chunk_size`` images (no
    ``predict`` overhead); see :func:`run_in_chunks` for why every call has that one shape."""

    def __init__(self, model, chunk_size: int):
        keras = require("keras")
        self.model = model
        self.chunk_size = chunk_size
        self._fn = None
        if keras.backend.backend() == "tensorflow":
            tf = require("tensorflow")

            s = model.input_shape[1]
            self._fn = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec([chunk_size, s, s, 3], tf.uint8)],
            )

    @property
    def n_features(self) -> int:
        return int(self.model.output_shape[-1])

    def versions(self) -> dict:
        return keras_versions()

    def _call(self, chunk: np.ndarray) -> np.ndarray:
        if self._fn is not None:
            return self._fn(chunk).numpy()
        return np.asarray(self.model(chunk, training=False))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return run_in_chunks(self._call, batch, self.chunk_size, self.n_features)


def run_in_chunks(call, batch: np.ndarray, chunk_size: int, n_features: int) -> np.ndarray:
    """``call`` on consecutive chunks of exactly ``chunk_size`` images, the last one padded with black
    images whose rows are dropped.

    Runtimes pick their kernels by batch shape, and the sums then differ in the last bits (float32
    Keras ResNet50 and EfficientNetB2 gave other features for 1 image a call than for 3), so one
    shape keeps an image's features independent of the batch it came in: no ``batch_size`` can
    make extract and a fitted Pipeline disagree.
    """
    n = len(batch)
    parts = []
    for lo in range(0, n, chunk_size):
        chunk = batch[lo:lo + chunk_size]
        if len(chunk) < chunk_size:
            chunk = np.concatenate([chunk, np.zeros((chunk_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        parts.append(np.asarray(call(chunk), dtype=np.float32).reshape(chunk_size, -1)[:n - lo])
    return np.concatenate(parts) if parts else np.empty((0, n_features), np.float32)


def cache_dir() -> Path:
    """Where compiled models are cached: $FRACFEAT_CACHE_DIR, else ~/.cache/fracfeat."""
    env = os.environ.get("FRACFEAT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fracfeat"


_OV_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _keras_to_openvino(ov, model):
    """Trace the Keras model's TensorFlow graph (uint8 in, dynamic batch) and convert it."""
    tf = require("tensorflow")

    s = model.input_shape[1]
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8)])
    return ov.convert_model(fn.get_concrete_function())


_CACHE_SUMS = "sha256.json"


def _cache_sums(entry: Path) -> dict:
    return {name: sha256_of_file(str(entry / name), float('inf')) for name in ("model.xml", "model.bin", "versions.json")}


def _check_cache_entry(entry: Path) -> None:
    """Raise unless the cached model files are byte for byte what was converted: a flipped bit in
    model.bin still loads, and would put slightly wrong features into the store under the right
    fingerprint."""
    try:
        expected = json.loads((entry / _CACHE_SUMS).read_text())
    except (OSError, ValueError):
        raise ValueError(f"no readable {_CACHE_SUMS}") from None
    if expected != _cache_sums(entry):
        raise ValueError("files do not match their sha256 (damaged)")


# Images each OpenVINO request always runs (see run_in_chunks). Measured side by side, ResNet50 on 2
# cores (2 requests): 1 per request ran 0.82x (bfloat16) / 0.86x (float32) the old 16 per request,
# 4 per request 0.95x / 0.96x, 8 per request 1.02x / 0.99x; 4 keeps a single image's padding small.
OPENVINO_IMAGES_PER_REQUEST = 4


def float32_openvino_model(config: ExtractorConfig, build_float32_model):
    """The float32 OpenVINO model of ``config``'s extractor (whatever its precision) and the versions that
    traced it: read from the content-verified cache under :func:`cache_dir`, else converted from the Keras
    model ``build_float32_model()`` makes, and cached. :func:`fracfeat.quantize` quantizes this very model.
    """
    ov = require("openvino", why="runtime='openvino'")
    root = cache_dir() / "openvino"
    # The converted graph is float32 whatever the precision hint: one entry serves every precision.
    float32 = dataclasses.replace(config, precision="float32", runtime="openvino", quantized="")
    key = f"{float32.fingerprint[:24]}-ov{ov.__version__.split('-')[0]}"
    xml = root / key / "model.xml"
    ov_model, versions = None, None
    if xml.is_file():
        try:
            _check_cache_entry(xml.parent)
            ov_model = ov.Core().read_model(str(xml))
        except Exception as e:  # a damaged cache entry is rebuilt, never fatal
            log.warning("ignoring unreadable OpenVINO cache %s (%s: %s)", xml.parent, type(e).__name__, e)
        # The Keras/TensorFlow that traced the graph, recorded at conversion: reading them back
        # spares importing TensorFlow (~0.7 GB, seconds) in runs that only need the cached model.
        try:
            versions = json.loads((xml.parent / "versions.json").read_text())
        except (OSError, ValueError):
            ov_model = None
        if ov_model is None:
            shutil.rmtree(xml.parent, ignore_errors=True)  # make room for a sound entry
    if ov_model is None:
        t = time.perf_counter()
        ov_model = _keras_to_openvino(ov, build_float32_model())
        versions = keras_versions()
        log.info("converted %s to OpenVINO in %.1fs", config.backbone, time.perf_counter() - t)
        OpenVINORunner._save(ov, ov_model, versions, root, key)
    return ov_model, {**versions, "openvino_version": ov.__version__}


class OpenVINORunner:
    """Runs the feature model compiled by OpenVINO for this CPU.

    The Keras model (built in float32) is converted once per extractor settings and OpenVINO
    version, and the converted model is cached under :func:`cache_dir`, so later runs skip building
    the Keras model and loading its weights. Precision is OpenVINO's inference precision hint.
    """

    def __init__(self, config: ExtractorConfig, build_float32_model):
        self.config = config
        ov_model, self._versions = float32_openvino_model(config, build_float32_model)
        self._compile(ov_model, _OV_PRECISION[config.precision])

    def _compile(self, ov_model, precision_hint: str) -> None:
        ov = require("openvino", why="runtime='openvino'")
        # THROUGHPUT: one stream per few cores, each running its share of a batch single-threaded.
        # Measured side by side on 2 cores, it beat LATENCY (all cores on one request) 2x for
        # EfficientNetB2, whose depthwise convolutions split poorly across threads, and matched it
        # for ResNet50/VGG16.
        properties = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "THROUGHPUT"}
        self.compiled = ov.Core().compile_model(ov_model, "CPU", properties)
        n_requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        # A queue of requests: each takes the next OPENVINO_IMAGES_PER_REQUEST images as soon as it is free, so
        # a stream slowed by a decode thread never holds the others back (they waited for each other on
        # every chunk before: +2-7% images/s in A/Bs at load 5-8, features bit-identical).
        self._queue = ov.AsyncInferQueue(self.compiled, n_requests)
        self._queue.set_callback(self._keep_output)
        self._outputs: list = []
        self.chunk_size = OPENVINO_IMAGES_PER_REQUEST * n_requests  # images the requests hold at once

    @staticmethod
    def _save(ov, ov_model, versions: dict, root: Path, key: str) -> None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
            # compress_to_fp16=False: the cached weights must stay the exact float32 values.
            ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
            (tmp / "versions.json").write_text(json.dumps(versions))
            (tmp / _CACHE_SUMS).write_text(json.dumps(_cache_sums(tmp)))
            try:
                os.replace(tmp, root / key)  # atomic: a reader sees a whole entry or none
            except OSError:  # another process cached it first
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            log.info("cannot cache the OpenVINO model under %s (%s); it will be converted again next time", root, e)

    @property
    def n_features(self) -> int:
        return int(self.compiled.output(0).get_partial_shape()[-1].get_length())

    def versions(self) -> dict:
        return dict(self._versions)

    def _keep_output(self, request, slot: int) -> None:
        self._outputs[slot] = request.get_output_tensor(0).data.copy()  # the request's buffer is reused

    def _call(self, chunk: np.ndarray) -> np.ndarray:
        # Every OPENVINO_IMAGES_PER_REQUEST images go to the next free request of the queue; the streams run
        # concurrently. share_inputs lets OpenVINO read the caller's buffer in place (safe: wait_all below).
        parts = np.split(chunk, len(chunk) // OPENVINO_IMAGES_PER_REQUEST)
        self._outputs = [None] * len(parts)
        for slot, part in enumerate(parts):
            self._queue.start_async({0: part}, slot, share_inputs=True)
        self._queue.wait_all()
        return np.concatenate(self._outputs)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # The whole batch in one call, padded with black images to whole requests: each request still runs
        # exactly OPENVINO_IMAGES_PER_REQUEST images (one shape, see run_in_chunks), and no stream waits for
        # another between chunks.
        whole = -(-max(len(batch), 1) // OPENVINO_IMAGES_PER_REQUEST) * OPENVINO_IMAGES_PER_REQUEST
        return run_in_chunks(self._call, batch, whole, self.n_features)


QUANTIZATION_FILE = "quantization.json"
INT8_IDENTITY = "int8:sha256:"
INT8_FORMAT = ("fracfeat-int8", 1)
# OpenVINO's inference precision hint for the ops NNCF leaves unquantized (preprocessing, pooling). On a
# Zen 4 with bfloat16, VGG16's int8 features were bitwise identical under "f32" and "bf16", and as fast
# (9.6 vs 9.4 images/s, medians of 5 interleaved repeats of 16 images, load average 7-8: mechanism only);
# "f32" then keeps int8 features the same on CPUs without bfloat16. benchmarks/int8.py times both.
INT8_PRECISION_HINT = "f32"


def quantized_identity(folder) -> str:
    """``int8:sha256:<hex>``: the sha256 of model.xml's bytes followed by model.bin's, the model's identity."""
    digest = hashlib.sha256()
    for name in ("model.xml", "model.bin"):
        with open(Path(folder) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return INT8_IDENTITY + digest.hexdigest()


def read_quantized(folder) -> dict:
    """quantization.json of a folder ``fracfeat quantize`` wrote, once its model files match the identity it
    records; a :class:`WeightsError` naming the folder and the fix otherwise (never a model that would give
    wrong features)."""
    folder = Path(folder)
    fix = "pass the folder `fracfeat quantize IMAGES --out DIR` wrote, or quantize again"
    try:
        record = json.loads((folder / QUANTIZATION_FILE).read_text())
        fmt = (record["format"], record["format_version"]), record["identity"]
    except FileNotFoundError:
        raise WeightsError(f"quantized={str(folder)!r} holds no {QUANTIZATION_FILE}: {fix}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"quantized={str(folder)!r}: {QUANTIZATION_FILE} cannot be read ({e}): {fix}") from None
    if fmt[0] != INT8_FORMAT:
        raise WeightsError(f"quantized={str(folder)!r} is format {fmt[0]}, not {INT8_FORMAT} that this fracfeat reads: "
                           f"quantize again with this version")
    try:
        identity = quantized_identity(folder)
    except OSError as e:
        raise WeightsError(f"quantized={str(folder)!r}: cannot read its model ({e}): {fix}") from None
    if identity != fmt[1]:
        raise WeightsError(f"quantized={str(folder)!r}: model.xml/model.bin do not match the sha256 {QUANTIZATION_FILE} "
                           f"records ({identity[:24]}... here, {fmt[1][:24]}... recorded): the files were damaged or "
                           f"edited; {fix}")
    return record


def _int8_root() -> Path:
    return cache_dir() / "int8"


def keep_quantized(folder, record: dict) -> Path:
    """Copy a verified quantized model into the cache (``<cache>/int8/<hex>``, by identity), so a runner, a
    store version's extractor or a saved Pipeline finds it by identity alone on this machine."""
    entry = _int8_root() / record["identity"].rsplit(":", 1)[-1]
    if (entry / QUANTIZATION_FILE).is_file() or Path(folder).resolve() == entry.resolve():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=entry.parent))
    try:
        for name in ("model.xml", "model.bin", QUANTIZATION_FILE):
            shutil.copyfile(Path(folder) / name, tmp / name)
        os.replace(tmp, entry)  # atomic: a reader sees a whole entry or none
    except OSError:  # another process kept it first (or the cache is unwritable: the runner says so)
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def kept_quantized(identity: str) -> tuple[Path, dict]:
    """The cached, verified folder of the quantized model ``identity`` names, and its record."""
    entry = _int8_root() / identity.rsplit(":", 1)[-1]
    if not (entry / QUANTIZATION_FILE).is_file():
        raise WeightsError(f"the int8 model {identity[:28]}... is not on this machine (not in {_int8_root()}): pass "
                           f"the folder `fracfeat quantize` wrote once more: quantized=DIR or --quantized DIR (a "
                           f"loaded Pipeline: pipeline.set_params(features__quantized=DIR))")
    return entry, read_quantized(entry)


class Int8Runner(OpenVINORunner):
    """Runs an int8 model made by :func:`fracfeat.quantize` (NNCF), found by ``config.quantized``'s identity
    in the cache and verified byte for byte; compiled and called as :class:`OpenVINORunner` does."""

    def __init__(self, config: ExtractorConfig):
        ov = require("openvino", why="precision='int8'")
        self.config = config
        folder, record = kept_quantized(config.quantized)
        self._versions = {**record.get("traced_with", {}), "openvino_version": ov.__version__,
                          "nncf_version": record.get("nncf_version", "")}
        self._compile(ov.Core().read_model(str(folder / "model.xml")), INT8_PRECISION_HINT)


def build_runner(config: ExtractorConfig, weights: ResolvedWeights):
    """The runner ``config.runtime`` names, for ``config``'s backbone, pooling and input size.

    OpenVINO converts the float32 Keras model (built only when its cache has no entry) and applies
    the precision as an inference hint; Keras builds the model under the precision's dtype policy.
    """
    if config.precision == "int8":
        return Int8Runner(config)
    if config.runtime == "openvino":
        float32 = dataclasses.replace(config, precision="float32")
        return OpenVINORunner(config, lambda: build_feature_model(float32, weights))
    return KerasRunner(build_feature_model(config, weights), keras_chunk_size())


def build_map_model(config: ExtractorConfig, weights: ResolvedWeights):
    """uint8 (n, s, s, 3) RGB -> the unpooled convolution maps the features are pooled from, float32.

    One (n, h, w, channels) output per layer of ``config.layers``, then the final one: the order the
    feature model concatenates their pooled values in. Same backbone, weights and preprocessing as
    :func:`build_feature_model`, built in float32 whatever ``config.precision`` (for explanations).
    """
    keras = require_keras()
    from keras import ops

    spec = backbone_spec(config.backbone)
    backbone = build_backbone(spec, config.image_size, weights, config.feature_layer)
    inputs = keras.Input((config.image_size, config.image_size, 3), dtype="uint8", name="rgb_uint8")
    x = preprocess_in_graph(ops, ops.cast(inputs, "float32"), config.preprocessing)
    taps = keras.Model(backbone.input, [backbone.get_layer(n).output for n in config.layers] + [backbone.output])
    maps = taps(x, training=False)
    return keras.Model(inputs, list(maps) if isinstance(maps, (list, tuple)) else [maps], name=f"fracfeat_{spec.name}_maps")
