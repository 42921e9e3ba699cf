"""Batches of image files -> feature rows, as fast as the hardware allows.

The one code path every feature goes through: ``extract`` (into the store) and ``DeepFeatures``
(inside a fitted Pipeline) both call :meth:`FeatureEngine.iter_features`.

The engine knows nothing of HDF5. Decoding runs in a thread pool ahead of the model (Pillow and
TensorFlow both release the GIL), so the CPU decodes the next batch while the backbone runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ._backbones import CAFFE_MEAN_BGR, BackboneSpec, ResolvedWeights, backbone_spec, build_backbone, resolve_weights
from ._config import ExtractorConfig, validate_detail, validate_layers, validate_settings
from ._errors import ConfigError, ImageError, WeightsError
from ._images import DecodedImage, load_image
from ._views import check_view

log = logging.getLogger("fracfeat")


def has_gpu() -> bool:
    """True when TensorFlow sees a GPU.

    Imports TensorFlow only where a GPU driver is visible, so CPU-only machines resolve "auto" cheaply.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    driver = os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")
    if not driver and sys.platform.startswith("linux"):
        return False
    from ._deps import require

    try:
        gpus = require("tensorflow").config.list_physical_devices("GPU")
    except Exception:
        return False
    if driver and not gpus:
        _warn_unused_gpu_driver()
    return bool(gpus)


@functools.lru_cache(maxsize=None)  # once per process: has_gpu() runs for every "auto" choice
def _warn_unused_gpu_driver() -> None:
    # TensorFlow's own reason (a CUDA library missing, a CPU-only wheel) is a native log line we
    # hide; this says what it means for the user.
    log.warning("a GPU driver is installed but TensorFlow finds no usable GPU, so features are computed on the "
                "CPU (slower); `fracfeat --verbose` (in Python: DEBUG logging of the 'fracfeat' logger) shows "
                "TensorFlow's reason; set CUDA_VISIBLE_DEVICES=-1 to use the CPU without this warning")


def cpuinfo_field(name: str) -> str:
    """The first CPU's ``name`` line of /proc/cpuinfo ("flags", "model name"); "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel exposes (Linux; empty elsewhere)."""
    return frozenset(cpuinfo_field("flags").split())


def cpu_has_bf16() -> bool:
    """True when the CPU does bfloat16 matrix math in hardware (AMX or AVX512-BF16).

    Without it bfloat16 is emulated and several times *slower* than float32 (measured: ResNet50 on
    OpenVINO 17.8 -> 4.6 images/s, on Keras 11.7 -> 2.0, on a 2-core Sapphire Rapids VM whose
    hypervisor hides AMX).
    """
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def gpu_supports_bfloat16() -> bool:
    """True when the first GPU has bfloat16 tensor cores (NVIDIA compute capability 8.0 or newer)."""
    from ._deps import require

    try:
        tf = require("tensorflow")
        gpus = tf.config.list_physical_devices("GPU")
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") if gpus else None
        return bool(cc) and tuple(cc) >= (8, 0)
    except Exception:
        return False


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


# Fastest correct CPU path per backbone, from benchmarks/extract_throughput.py (results/ holds the
# JSON). Without bfloat16 hardware: float32 everywhere, on the runtime that ran faster forward-only on
# 2 cores: OpenVINO for ResNet50 (1.4x Keras) and VGG16 (tie; OpenVINO's cached model skips building
# the Keras model, seconds per run); Keras for EfficientNetB2 (1.5x OpenVINO, depthwise convolutions).
_CPU_FLOAT32_RUNTIME = {"vgg16": "openvino", "resnet50": "openvino", "efficientnetb2": "keras"}
# With AMX (figures quoted in issue 5, measured on a machine that exposes it; not re-measured here):
# mixed_bfloat16 Keras ran VGG16 ~10x float32 (~50 images/s), OpenVINO bf16 ran ResNet50 ~85 and
# EfficientNetB2 ~55 images/s, while Keras bf16 did nothing for ResNet50.
_CPU_BF16_RUNTIME = {"vgg16": "keras", "resnet50": "openvino", "efficientnetb2": "openvino"}


@dataclass(frozen=True)
class Hardware:
    """What the "auto" choices depend on. :meth:`detect` reads this machine; tests build one of each kind,
    so every branch of every hardware-dependent choice runs on every machine."""

    gpu: bool = False
    gpu_bfloat16: bool = False  # tensor cores with bfloat16 (NVIDIA compute capability >= 8.0)
    cpu_bfloat16: bool = False  # AMX or AVX512-BF16
    openvino: bool = False

    @classmethod
    def detect(cls) -> "Hardware":
        gpu = has_gpu()
        return cls(gpu=gpu, gpu_bfloat16=gpu and gpu_supports_bfloat16(), cpu_bfloat16=cpu_has_bf16(),
                   openvino=openvino_available())


def describe_machine() -> dict:
    """What a benchmark ran on: CPU model, the flags that change the fast path, cores, and :class:`Hardware`."""
    import platform

    model = cpuinfo_field("model name")
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"})
    return {"cpu": model or platform.processor(), "cpu_flags": flags, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), **dataclasses.asdict(Hardware.detect())}


def choose_precision_and_runtime(spec: BackboneSpec, precision: str, runtime: str,
                                 hardware: Hardware | None = None) -> tuple[str, str]:
    """Resolve "auto" to the fastest correct path for this backbone on ``hardware`` (default: this machine).

    - GPU visible: Keras with mixed precision on the tensor cores (OpenVINO targets Intel devices):
      bfloat16 where the GPU has it (float32's range: float16 overflowed to NaN in deep ResNet50 and
      EfficientNetB2 activations in our tests), float16 on older GPUs.
    - CPU with bfloat16 hardware: bfloat16 on the runtime measured fastest for the backbone.
    - Other CPUs: float32 (emulated bfloat16 is slower), on OpenVINO when installed, else Keras.

    A forced ``runtime``/``precision`` is kept as given; "auto" on the other one is resolved around
    it. Every path agrees with float32 Keras to cosine similarity >= 0.999 per image (tested).
    """
    if runtime != "auto" and precision != "auto":
        return precision, runtime
    hw = Hardware.detect() if hardware is None else hardware
    if runtime == "auto":
        if hw.gpu:
            runtime = "keras"
        else:
            bf16 = hw.cpu_bfloat16 and precision in ("auto", "bfloat16")
            runtime = (_CPU_BF16_RUNTIME if bf16 else _CPU_FLOAT32_RUNTIME)[spec.name]
            if runtime == "openvino" and not hw.openvino:
                log.info("OpenVINO is not installed: extracting with Keras/TensorFlow instead "
                         "(pip install 'fracfeat[openvino]' for faster CPU extraction)")
                runtime = "keras"
    if precision == "auto":
        if hw.gpu and runtime == "keras":
            precision = "bfloat16" if hw.gpu_bfloat16 else "float16"
        elif hw.cpu_bfloat16 and not hw.gpu:
            precision = "bfloat16"
        else:
            precision = "float32"
    return precision, runtime


def preferred_batch_size(config: ExtractorConfig, hardware: Hardware | None = None) -> int:
    """Images per forward pass when the user gives none: large on a GPU, moderate on CPUs."""
    if config.runtime != "keras":
        return 32
    hw = Hardware.detect() if hardware is None else hardware
    return 256 if hw.gpu else 32


def resolve_extractor(
    backbone="vgg16", weights="imagenet", image_size=None, pooling="avg",
    precision="auto", runtime="auto", truncated="read", tiles=1, scales=None, layers=None, view=None,
) -> tuple[ExtractorConfig, ResolvedWeights]:
    spec, size, pool, prec, rt, tr = validate_settings(backbone, image_size, pooling, precision, runtime, truncated)
    size, tiles, scales = validate_detail(spec, size, tiles, scales)
    layers = validate_layers(spec, pool, layers)
    view = check_view(view)
    resolved = resolve_weights(spec, weights)
    prec, rt = choose_precision_and_runtime(spec, prec, rt)
    config = ExtractorConfig(
        backbone=spec.name, image_size=size, pooling=pool, preprocessing=spec.preprocessing,
        weights=resolved.identity, precision=prec, runtime=rt, truncated=tr, tiles=tiles, scales=scales,
        layers=layers, view=view,
    )
    return config, resolved


def config_from_provenance(provenance: dict) -> ExtractorConfig:
    """The exact extractor a store version was made with (resolved precision/runtime, no "auto")."""
    import dataclasses

    optional = {"tiles", "scales", "layers", "view"}  # absent when at their defaults (and in versions made before them)
    names = [f.name for f in dataclasses.fields(ExtractorConfig)]
    missing = [n for n in names if n not in provenance and n not in optional]
    if missing:
        raise ConfigError(f"provenance lacks {', '.join(missing)}: it does not come from a fracfeat store version")
    values = {n: provenance[n] for n in names if n in provenance}
    if "scales" in values:
        values["scales"] = tuple(int(v) for v in values["scales"])
    if "layers" in values:
        values["layers"] = tuple(str(v) for v in values["layers"])
    config = ExtractorConfig(**values)
    recorded = provenance.get("fingerprint")
    if recorded and recorded != config.fingerprint:
        raise ConfigError(f"provenance fingerprint {recorded[:12]} does not match its own settings "
                          f"({config.fingerprint[:12]}): the version's attributes were edited or damaged")
    return config


def _digest(identity: str) -> str:
    # "file:sha256:<hex>" and "imagenet:sha256:<hex>" name the same bytes when the hex agrees.
    return identity.rsplit(":", 1)[-1] if ":sha256:" in identity else identity


def verified_weights(config: ExtractorConfig, weights) -> ResolvedWeights:
    """Resolve ``weights`` ("imagenet", a path, or None) and check they are the ones ``config`` names.

    Raises :class:`WeightsError` when the file's sha256 differs from the recorded identity, because
    other weights give other features and every prediction would silently be wrong.
    """
    resolved = resolve_weights(backbone_spec(config.backbone), weights)
    if _digest(resolved.identity) != _digest(config.weights):
        raise WeightsError(
            f"weights {resolved.path or weights!r} ({resolved.identity}) are not the weights these features were "
            f"made with ({config.weights}). Pass the original file, e.g. "
            f"pipeline.set_params(features__weights='/path/to/original.h5')"
        )
    return ResolvedWeights(resolved.kind, resolved.path, config.weights)


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
        if config.layers:
            x = _pooled_taps(keras, backbone, config)(x, training=False)
        else:
            x = _pool(layers, config.pooling)(backbone(x, training=False))
        x = ops.cast(x, "float32")
        return keras.Model(inputs, x, name=f"fracfeat_{spec.name}")
    finally:
        keras.config.set_dtype_policy(policy_before)


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
    from ._deps import require

    keras = require("keras")

    versions = {"keras_version": keras.__version__, "keras_backend": keras.backend.backend(), "tensorflow_version": ""}
    if "tensorflow" in sys.modules:
        versions["tensorflow_version"] = sys.modules["tensorflow"].__version__
    return versions


class KerasRunner:
    """Runs the feature model with one compiled graph call per batch (no ``predict`` overhead)."""

    def __init__(self, model):
        from ._deps import require

        keras = require("keras")
        self.model = model
        self._fn = None
        if keras.backend.backend() == "tensorflow":
            tf = require("tensorflow")

            s = model.input_shape[1]
            self._fn = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8)],
            )

    @property
    def n_features(self) -> int:
        return int(self.model.output_shape[-1])

    def versions(self) -> dict:
        return keras_versions()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._fn is not None:
            return self._fn(batch).numpy()
        return np.asarray(self.model(batch, training=False))


def cache_dir() -> Path:
    """Where compiled models are cached: $FRACFEAT_CACHE_DIR, else ~/.cache/fracfeat."""
    env = os.environ.get("FRACFEAT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fracfeat"


_OV_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _keras_to_openvino(ov, model):
    """Trace the Keras model's TensorFlow graph (uint8 in, dynamic batch) and convert it."""
    from ._deps import require

    tf = require("tensorflow")

    s = model.input_shape[1]
    fn = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8)])
    return ov.convert_model(fn.get_concrete_function())


_CACHE_SUMS = "sha256.json"


def _cache_sums(entry: Path) -> dict:
    from ._images import sha256_of_file

    return {name: sha256_of_file(str(entry / name)) for name in ("model.xml", "model.bin", "versions.json")}


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


class OpenVINORunner:
    """Runs the feature model compiled by OpenVINO for this CPU.

    The Keras model (built in float32) is converted once per extractor settings and OpenVINO
    version, and the converted model is cached under :func:`cache_dir`, so later runs skip building
    the Keras model and loading its weights. Precision is OpenVINO's inference precision hint.
    """

    def __init__(self, config: ExtractorConfig, build_float32_model):
        from ._deps import require

        ov = require("openvino", why="runtime='openvino'")
        self.config = config
        core = ov.Core()
        root = cache_dir() / "openvino"
        # The converted graph is float32 whatever the precision hint: one entry serves every precision.
        float32 = dataclasses.replace(config, precision="float32")
        key = f"{float32.fingerprint[:24]}-ov{ov.__version__.split('-')[0]}"
        xml = root / key / "model.xml"
        ov_model = None
        if xml.is_file():
            try:
                _check_cache_entry(xml.parent)
                ov_model = core.read_model(str(xml))
            except Exception as e:  # a damaged cache entry is rebuilt, never fatal
                log.warning("ignoring unreadable OpenVINO cache %s (%s: %s)", xml.parent, type(e).__name__, e)
            # The Keras/TensorFlow that traced the graph, recorded at conversion: reading them back
            # spares importing TensorFlow (~0.7 GB, seconds) in runs that only need the cached model.
            try:
                self._versions = json.loads((xml.parent / "versions.json").read_text())
            except (OSError, ValueError):
                ov_model = None
            if ov_model is None:
                import shutil

                shutil.rmtree(xml.parent, ignore_errors=True)  # make room for a sound entry
        if ov_model is None:
            t = time.perf_counter()
            ov_model = _keras_to_openvino(ov, build_float32_model())
            self._versions = keras_versions()
            log.info("converted %s to OpenVINO in %.1fs", config.backbone, time.perf_counter() - t)
            self._save(ov, ov_model, self._versions, root, key)
        self._versions = {**self._versions, "openvino_version": ov.__version__}
        # THROUGHPUT: one stream per few cores, each running its share of a batch single-threaded.
        # Measured side by side on 2 cores, it beat LATENCY (all cores on one request) 2x for
        # EfficientNetB2, whose depthwise convolutions split poorly across threads, and matched it
        # for ResNet50/VGG16.
        properties = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[config.precision], "PERFORMANCE_HINT": "THROUGHPUT"}
        self.compiled = core.compile_model(ov_model, "CPU", properties)
        n_requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = [self.compiled.create_infer_request() for _ in range(n_requests)]

    @staticmethod
    def _save(ov, ov_model, versions: dict, root: Path, key: str) -> None:
        import shutil
        import tempfile

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

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # The batch is split across the streams' requests, which run concurrently; share_inputs lets
        # OpenVINO read the caller's buffer in place (safe: we wait for every request before returning).
        bounds = np.linspace(0, len(batch), len(self._requests) + 1).astype(int)
        running = []
        for request, lo, hi in zip(self._requests, bounds[:-1], bounds[1:]):
            if hi > lo:
                request.start_async({0: batch[lo:hi]}, share_inputs=True)
                running.append(request)
        if not running:
            return np.empty((0, self.n_features), np.float32)
        for request in running:
            request.wait()
        return np.concatenate([request.get_output_tensor(0).data for request in running])


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
        self._runners: dict[int, object] = {}

    def runner_for(self, size: int):
        """The backbone + pooling at one input size (a plain extractor: no tiles, no scales)."""
        if size not in self._runners:
            # The view is applied to pixels before the graph: every view shares one graph (and OpenVINO cache entry).
            unit = dataclasses.replace(self.config, image_size=size, tiles=1, scales=(), view="")
            if unit.runtime == "openvino":
                float32 = dataclasses.replace(unit, precision="float32")
                self._runners[size] = OpenVINORunner(unit, lambda: _build_feature_model(float32, self.weights))
            else:
                self._runners[size] = KerasRunner(_build_feature_model(unit, self.weights))
        return self._runners[size]

    @property
    def runner(self):
        return self.runner_for(self.config.image_size if not self.config.scales else self.config.scales[0])

    @property
    def n_features(self) -> int:
        c = self.config
        if c.scales:
            return sum(self.runner_for(s).n_features for s in c.scales)
        return self.runner.n_features * (2 if c.tiles > 1 else 1)

    def versions(self) -> dict:
        """Versions of the software computing the features (for provenance)."""
        return self.runner.versions()

    def _run(self, runner, batch: np.ndarray) -> np.ndarray:
        out = runner(np.ascontiguousarray(batch, dtype=np.uint8))
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Features of already decoded uint8 images, shape (n, d, d, 3) with d = ``config.decode_size``."""
        c = self.config
        if c.tiles > 1:
            s, n, stride = c.image_size, c.tiles, c.image_size // 2
            tiles = np.stack([batch[:, i * stride:i * stride + s, j * stride:j * stride + s]
                              for i in range(n) for j in range(n)], axis=1)  # (b, n*n, s, s, 3)
            feats = self._run(self.runner, tiles.reshape(-1, s, s, 3)).reshape(len(batch), n * n, -1)
            return np.concatenate([feats.mean(axis=1), feats.max(axis=1)], axis=1)
        if c.scales:
            from ._images import pixels_from_array

            parts = []
            for size in c.scales:
                # Smaller scales are resized from the decoded largest one with the decoder's own filter.
                scaled = batch if size == c.decode_size else np.stack([pixels_from_array(im, size) for im in batch])
                parts.append(self._run(self.runner_for(size), scaled))
            return np.concatenate(parts, axis=1)
        return self._run(self.runner, batch)

    def iter_decoded(self, paths: Sequence[str], workers: int | None = None, lookahead: int = 64,
                     sha256s: Sequence[str] | None = None) -> Iterator[tuple[int, DecodedImage]]:
        """Decode files in a thread pool, yielding results in input order.

        ``sha256s``: the hash each file had when it was looked up in the cache; a file whose bytes
        differ now is a failure (its features would otherwise be stored under the old hash).
        """
        size, policy, view = self.config.decode_size, self.config.truncated, self.config.view
        workers = workers or min(32, (os.cpu_count() or 1) + 1)

        def submit(pool, i, p):
            return pool.submit(load_image, p, size, policy, None if sha256s is None else sha256s[i], view)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fracfeat-decode") as pool:
            pending: deque = deque()
            it = iter(enumerate(paths))
            for i, p in it:
                pending.append((i, submit(pool, i, p)))
                if len(pending) >= lookahead:
                    break
            while pending:
                i, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], submit(pool, *nxt)))
                yield i, fut.result()

    def iter_features(
        self, paths: Sequence[str], batch_size: int = 32, strict: bool = False, workers: int | None = None,
        sha256s: Sequence[str] | None = None,
    ) -> Iterator[FeatureBatch]:
        """Yield a :class:`FeatureBatch` per ``batch_size`` decoded images, in input order."""
        size = self.config.decode_size
        buf = np.empty((batch_size, size, size, 3), dtype=np.uint8)
        idx: list[int] = []
        failures: list[tuple[int, str]] = []
        truncated: list[int] = []
        for i, decoded in self.iter_decoded(paths, workers=workers, lookahead=max(2 * batch_size, 16), sha256s=sha256s):
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
