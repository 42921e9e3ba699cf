"""How close forward passes come to the hardware's ceiling: work per image and the machine's peak rate.

- :func:`gflop_per_image`: floating-point operations of one forward pass (2 per multiply-add), summed
  over the convolution, depthwise-convolution and dense layers of the Keras backbone at a given input
  size. Everything else (batch norm, activations, pooling) is a rounding error next to them.
- :func:`cpu_peak_gflops`: the nominal float32 peak of this CPU: cores x FLOP per cycle of its widest
  FMA units x the clock /proc/cpuinfo reports. (A measured GEMM rate was tried and dropped: on a shared
  2-core VM it swings with the neighbours' load, and Keras' convolutions beat it by 2x.) Winograd
  convolutions do fewer multiplications than the direct count and turbo clocks run above the reported
  one, so a share slightly above 100% is possible and means "at the ceiling".
- :func:`gpu_peak_tflops`: the nominal dense tensor-core rate of a known GPU, for the share of the
  GPU roofline a forward pass reaches.

    python benchmarks/roofline.py            # GFLOP per image per backbone, and this CPU's nominal peak
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16/fp16 tensor-core TFLOP/s (no sparsity), from NVIDIA's data sheets; the first key whose words
# all appear in the device name wins (device names read like "NVIDIA H100 80GB HBM3"), so PCIe comes first.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def _layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):  # a nested Model (the backbone inside fracfeat's feature model)
            yield from _layers(layer)
        else:
            yield layer


def gflop_per_image(backbone: str, image_size: int | None = None) -> float:
    """GFLOP (2 x multiply-adds) of one forward pass of ``backbone`` without its top."""
    from fracfeat._backbones import backbone_spec, build_backbone, resolve_image_size, resolve_weights

    spec = backbone_spec(backbone)
    size = resolve_image_size(spec, image_size)
    model = build_backbone(spec, size, resolve_weights(spec, None))
    macs = 0
    for layer in _layers(model):
        kind = type(layer).__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        out = [int(d) for d in layer.output.shape[1:]]
        kernel = [int(d) for d in layer.kernel.shape]  # (kh, kw, in, out) / (kh, kw, in, mult) / (in, out)
        # Multiply-adds per output value: the kernel's fan-in; a depthwise channel sees one input channel.
        per_output = kernel[0] * kernel[1] if kind == "DepthwiseConv2D" else math.prod(kernel[:-1])
        macs += math.prod(out) * per_output
    return 2 * macs / 1e9


def cpu_peak_gflops() -> tuple[float, str]:
    """(GFLOP/s, how it was derived): nominal float32 FMA peak of all cores at the reported clock."""
    flags, mhz = set(), 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
    # Two FMA units per core (Xeon Skylake-SP and later, desktop Haswell and later): 2 x lanes x 2 FLOP.
    lanes = 16 if "avx512f" in flags else 8 if "fma" in flags else 4
    per_cycle = 2 * lanes * 2
    cores = os.cpu_count() or 1
    return cores * per_cycle * mhz / 1000, f"{cores} cores x {per_cycle} float32 FLOP/cycle x {mhz:.0f} MHz"


def gpu_peak_tflops() -> tuple[str, float] | None:
    """(name, dense bf16 TFLOP/s) of the first GPU when its model is in :data:`GPU_PEAK_TFLOPS`."""
    try:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "") if gpus else ""
    except Exception:
        return None
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if all(part in name for part in key.split()):
            return name, tflops
    return None


if __name__ == "__main__":
    for bb in ("vgg16", "resnet50", "efficientnetb2"):
        print(f"{bb:15s} {gflop_per_image(bb):6.2f} GFLOP per image at its default size", flush=True)
    peak, how = cpu_peak_gflops()
    print(f"nominal float32 peak of this CPU: {peak:.0f} GFLOP/s ({how})")
