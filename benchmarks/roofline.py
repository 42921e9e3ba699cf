"""How close forward passes come to the hardware's ceiling: work per image and the machine's peak rate.

- :func:`gflop_per_image`: floating-point operations of one forward pass (2 per multiply-add), summed
  over the convolution, depthwise-convolution and dense layers of the Keras backbone at a given input
  size. Everything else (batch norm, activations, pooling) is a rounding error next to them.
- :func:`cpu_matmul_gflops`: float32 matrix-multiply rate this machine actually sustains on all its
  cores (large GEMMs through TensorFlow's oneDNN/Eigen kernels): the practical float32 roofline of a
  CPU, since a convolution lowers to the same kernels.
- :func:`gpu_peak_tflops`: the nominal dense tensor-core rate of a known GPU, for the share of the
  GPU roofline a forward pass reaches.

    python benchmarks/roofline.py            # GFLOP per image per backbone, and this CPU's GEMM rate
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16/fp16 tensor-core TFLOP/s (no sparsity), from NVIDIA's data sheets.
GPU_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


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
        positions = 1
        for d in out[:-1]:
            positions *= d
        kernel = [int(d) for d in layer.kernel.shape]  # (kh, kw, in, out) / (kh, kw, in, mult) / (in, out)
        per_output = 1
        for d in kernel[:-1]:
            per_output *= d
        if kind == "DepthwiseConv2D":
            per_output = kernel[0] * kernel[1]  # each output channel sees one input channel
        macs += positions * out[-1] * per_output
    return 2 * macs / 1e9


def cpu_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Median float32 GEMM rate (GFLOP/s) of TensorFlow on this CPU, all cores."""
    import tensorflow as tf

    with tf.device("/CPU:0"):
        a = tf.random.uniform((n, n), dtype=tf.float32)
        b = tf.random.uniform((n, n), dtype=tf.float32)
        matmul = tf.function(lambda x, y: tf.linalg.matmul(x, y))
        matmul(a, b).numpy()
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(4):
                c = matmul(a, b)
            c.numpy()
            rates.append(4 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


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
    print(f"float32 GEMM on this CPU ({os.cpu_count()} cores): {cpu_matmul_gflops():.0f} GFLOP/s")
