"""How close forward passes come to the hardware's ceiling: work per image and the machine's peak rate.

- :func:`gflop_per_image`: floating-point operations of one forward pass (2 per multiply-add), summed
  over the convolution, depthwise-convolution and dense layers of the Keras backbone at a given input
  size. Everything else (batch norm, activations, pooling) is a rounding error next to them.
- :func:`measured_ceilings`: the ceiling measured on this machine, per precision, with the library
  each runtime uses: GEMMs shaped like the backbones' big convolutions (im2col: output pixels x
  kernel fan-in x filters) through TensorFlow's matmul (oneDNN; float32, bfloat16) and through a
  one-MatMul OpenVINO model compiled with its inference-precision hint (float32, bfloat16, and int8 by
  FakeQuantize inputs where the CPU has VNNI or AMX). Repeats, medians; the ceiling of a precision is
  its fastest shape on its fastest library. Each compiled OpenVINO MatMul reports the precision it ran
  in, so a hint the CPU ignored shows. On a shared machine these swing with the neighbours' load: take
  them with the load average, idle for the record.
- :func:`cpu_peak_gflops`: the nominal float32 peak from the clock and the vector width, for reference
  only: it assumes two FMA units of the full vector width, wrong where 512-bit vectors run on 256-bit
  units (AMD Zen 4: half), so shares are taken of the measured ceilings.
- :func:`gpu_peak_tflops`: the nominal dense tensor-core rate of a known GPU, for the share of the
  GPU roofline a forward pass reaches.

    python benchmarks/roofline.py            # GFLOP per image, the measured ceilings, the nominal peak
    python benchmarks/roofline.py --gemm-only --repeats 7
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16/fp16 tensor-core TFLOP/s (no sparsity), from NVIDIA's data sheets; the first key whose words
# all appear in the device name wins (device names read like "NVIDIA H100 80GB HBM3"), so PCIe comes first.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}

# Big convolutions of the backbones at 224 px for one image, as GEMMs (M output pixels, K = kh*kw*in
# channels, N filters): where a forward pass spends its time.
GEMM_SHAPES = {
    "vgg16 block3 3x3 (3136x2304x256)": (3136, 2304, 256),
    "vgg16 block4 3x3 (784x4608x512)": (784, 4608, 512),
    "resnet50 conv4 1x1 (784x1024x256)": (784, 1024, 256),
}
INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


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


def _median_gflops(run, flop: float, repeats: int, min_s: float = 0.2) -> float:
    """GFLOP/s of ``run()`` (one GEMM): warm-up, enough calls per timing to last ``min_s``, median of repeats."""
    run(), run()
    t = time.perf_counter()
    run()
    calls = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            run()
        rates.append(flop * calls / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def tensorflow_gemm(m: int, k: int, n: int, precision: str):
    """One (m, k) x (k, n) matmul on TensorFlow's CPU kernels (oneDNN), in a compiled graph."""
    import numpy as np
    import tensorflow as tf

    dtype = {"float32": tf.float32, "bfloat16": tf.bfloat16}[precision]
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((m, k), dtype=np.float32), dtype=dtype)
    b = tf.constant(rng.standard_normal((k, n), dtype=np.float32), dtype=dtype)
    fn = tf.function(lambda: tf.linalg.matmul(a, b))
    return lambda: fn().numpy()


def openvino_gemm(m: int, k: int, n: int, precision: str):
    """(run, the precision OpenVINO's MatMul ran in) for a one-MatMul model: float32 input, constant
    weights, the precision as inference hint; int8 puts FakeQuantize on both operands, as a quantized
    model does, so the CPU plugin runs the MatMul on u8 x i8."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([m, k], ov.Type.f32, name="a")
    w = ops.constant(rng.standard_normal((k, n)).astype(np.float32))
    if precision == "int8":
        def fq(x, lo, hi, levels):
            c = [ops.constant(np.float32(v)) for v in (lo, hi, lo, hi)]
            return ops.fake_quantize(x, *c, levels)
        a_in, w = fq(a, 0.0, 4.0, 256), fq(w, -4.0, 4.0, 255)
    else:
        a_in = a
    model = ov.Model([ops.result(ops.matmul(a_in, w, False, False))], [a], "gemm")
    hint = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}[precision]
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = np.abs(rng.standard_normal((m, k))).astype(np.float32)
    ran_in = ""
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].value in ("MatMul", "FullyConnected"):
            ran_in = f"{info['runtimePrecision'].value} {info['primitiveType'].value}"
    return (lambda: request.infer({0: x})), ran_in


def gemm_precisions() -> dict[str, list[str]]:
    """Library -> precisions to measure here: bfloat16 where the CPU does it in hardware, int8 (OpenVINO)
    where it has VNNI or AMX."""
    from fracfeat._hardware import cpu_flags, cpu_has_bf16, openvino_available

    bf16 = ["bfloat16"] if cpu_has_bf16() else []
    out = {"tensorflow": ["float32", *bf16]}
    if openvino_available():
        out["openvino"] = ["float32", *bf16, *(["int8"] if INT8_FLAGS & cpu_flags() else [])]
    return out


def measured_ceilings(repeats: int = 5, shapes: dict | None = None) -> dict:
    """GEMM GFLOP/s (int8: GOP/s) per library, precision and shape, medians of ``repeats``, and
    ``ceilings``: per precision the fastest, with where it came from."""
    shapes = GEMM_SHAPES if shapes is None else shapes
    runs, ceilings = [], {}
    for library, precisions in gemm_precisions().items():
        for precision in precisions:
            for name, (m, k, n) in shapes.items():
                if library == "tensorflow":
                    run, ran_in = tensorflow_gemm(m, k, n, precision), precision
                else:
                    run, ran_in = openvino_gemm(m, k, n, precision)
                rate = _median_gflops(run, 2.0 * m * k * n, repeats)
                runs.append({"library": library, "precision": precision, "shape": name, "gflop_per_s": round(rate, 1),
                             "ran_in": ran_in})
                best = ceilings.get(precision)
                if best is None or rate > best["gflop_per_s"]:
                    ceilings[precision] = {"gflop_per_s": round(rate, 1), "library": library, "shape": name}
    return {"repeats": repeats, "load_avg": [round(x, 2) for x in os.getloadavg()], "runs": runs,
            "ceilings": ceilings}


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="GFLOP per image and this machine's measured GEMM ceilings")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gemm-only", action="store_true", help="skip the GFLOP-per-image count")
    ap.add_argument("--out", help="write the ceilings as JSON here")
    args = ap.parse_args(argv)
    from fracfeat._hardware import describe_machine

    machine = describe_machine()
    print(f"CPU: {machine['cpu']}, {machine['cpu_count']} cores, flags {' '.join(machine['cpu_flags'])}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if not args.gemm_only:
        for bb in ("vgg16", "resnet50", "efficientnetb2"):
            print(f"{bb:15s} {gflop_per_image(bb):6.2f} GFLOP per image at its default size", flush=True)
    result = measured_ceilings(args.repeats)
    for r in result["runs"]:
        ran = f" (ran in {r['ran_in']})" if r["ran_in"] and r["library"] == "openvino" else ""
        print(f"{r['library']:10s} {r['precision']:8s} {r['shape']:36s} {r['gflop_per_s']:8.1f} GFLOP/s{ran}",
              flush=True)
    for precision, c in result["ceilings"].items():
        print(f"ceiling {precision:8s} {c['gflop_per_s']:8.1f} GFLOP/s ({c['library']}, {c['shape']})")
    peak, how = cpu_peak_gflops()
    print(f"nominal float32 peak, for reference: {peak:.0f} GFLOP/s ({how}; assumes full-width FMA units)")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
