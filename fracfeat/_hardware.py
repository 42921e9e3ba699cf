"""What this machine can do, and the fastest correct extraction path on it.

GPU and CPU detection (bfloat16 hardware, OpenVINO), the "auto" choices of precision, runtime and
batch size: a path measured on this machine where one applies (fracfeat._path_choice), else the hand
tables below. Nothing here imports TensorFlow unless a GPU driver is visible, so resolving "auto" on a
CPU stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import platform
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._backbones import BackboneSpec
from ._deps import require

if TYPE_CHECKING:  # _config imports this module
    from ._config import ExtractorConfig

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
    try:
        tf = require("tensorflow")
        gpus = tf.config.list_physical_devices("GPU")
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") if gpus else None
        return bool(cc) and tuple(cc) >= (8, 0)
    except Exception:
        return False


def openvino_available() -> bool:
    """True when the openvino package is installed (found, not imported)."""
    return importlib.util.find_spec("openvino") is not None


# The fallback where no measured decision applies (fracfeat._path_choice: random weights, tiny inputs,
# FRACFEAT_CALIBRATE=off, hardware given by the caller).
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


# The CPU flags that change which extraction path is fastest (vector width, bfloat16 and int8 units).
SPEED_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                         "amx_int8", "amx_tile"})


def speed_flags(flags: frozenset[str]) -> list[str]:
    """The :data:`SPEED_FLAGS` among ``flags``, sorted."""
    return sorted(flags & SPEED_FLAGS)


def describe_machine() -> dict:
    """What a benchmark ran on: CPU model, the flags that change the fast path, cores, and :class:`Hardware`."""
    model = cpuinfo_field("model name")
    flags = speed_flags(cpu_flags())
    return {"cpu": model or platform.processor(), "cpu_flags": flags, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), **dataclasses.asdict(Hardware.detect())}


def choose_precision_and_runtime(spec: BackboneSpec, precision: str, runtime: str,
                                 hardware: Hardware | None = None, *,
                                 calibration: dict | None = None) -> tuple[str, str]:
    """Resolve "auto" to the fastest correct path for this backbone on ``hardware`` (default: this machine).

    On this machine (``hardware`` None), given ``calibration`` (the keywords of
    :func:`fracfeat._path_choice.calibrated_path`: the settings, input size and weights), a path measured
    here decides (cached, or calibrated on first use where that is worth it); elsewhere the tables:

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
    if hardware is None and calibration is not None:
        from ._path_choice import calibrated_path  # it imports this module

        measured = calibrated_path(spec, precision, runtime, **calibration)
        if measured is not None:
            return measured
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


def keras_chunk_size(hardware: Hardware | None = None) -> int:
    """Images per Keras model call, fixed per machine and never the caller's batch size
    (:func:`fracfeat._runtimes.run_in_chunks` pads the last chunk).

    On CPUs 8: measured side by side on 2 cores, chunks of 8 ran at 0.95-1.05x the old 32-image
    calls (ResNet50, EfficientNetB2, VGG16 bfloat16), chunks of 4 at 0.89-0.93x; a single image
    then costs 8 (about 7x the time of one). On a GPU, which needs wide calls to be fed, 64 (not
    measured here: no GPU on the development machines).
    """
    hw = Hardware.detect() if hardware is None else hardware
    return 64 if hw.gpu else 8
