"""int8 extraction (OpenVINO + NNCF) against float32 and bfloat16: speed, agreement, accuracy.

``speed`` (default): per backbone, on the same decoded real radiographs, forward-only images/s of
float32/keras, float32/openvino, bfloat16/openvino (where the CPU has bfloat16) and int8/openvino
(both precision hints for the ops NNCF leaves unquantized: f32, and bf16 where the CPU has it),
medians of ``--repeats`` interleaved repeats, the ratios int8/bfloat16 and int8/float32, plus int8
``extract`` end to end (``--e2e-n`` image files -> a fresh store, the int8 model's compilation included). VGG16 with the real ImageNet weights; ResNet50 and
EfficientNetB2 with seeded random weights (no ImageNet weights here), each quantized on the same real
images. Under load the figures show the mechanism only: the load average is recorded.

    python benchmarks/int8.py speed --backbones vgg16,resnet50,efficientnetb2 --out benchmarks/results/int8.json

``agreement``: per-image cosine of int8 (a folder ``fracfeat quantize`` wrote) vs float32 Keras features
on FracAtlas images outside its calibration sample and on HBFMID (another source), per hint.

    python benchmarks/int8.py agreement --quantized DIR --fracatlas 200 --hbfmid 100

``accuracy``: benchmarks/accuracy.py's svm-avg (grouped CV, group-bootstrap intervals) on features of
``--precision float32`` (OpenVINO) or of the int8 model ``--quantized DIR``, into ``--store``.

    python benchmarks/int8.py accuracy --quantized DIR --store /work/stores/int8_fracatlas --trials 10 --inner-cv 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fracfeat import extract, quantize  # noqa: E402
from fracfeat import _runtimes  # noqa: E402
from fracfeat._config import ExtractorSettings  # noqa: E402
from fracfeat._engine import FeatureEngine  # noqa: E402
from fracfeat._hardware import Hardware, describe_machine  # noqa: E402
from fracfeat._path_choice import cosine_per_image, time_interleaved  # noqa: E402

SHARED = REPO.parent / "shared"
FRACATLAS = SHARED / "data" / "fracatlas"
HBFMID = SHARED / "data" / "hbfmid"
VGG16_WEIGHTS = SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"
HINTS = ("f32", "bf16")


def manifest_paths(root: Path, use_only: bool = True) -> list[str]:
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [str(root / r["path"]) for r in rows if not use_only or r.get("use", "1") == "1"]


def spread(paths: list[str], n: int, skip: set[str] = frozenset()) -> list[str]:
    """``n`` paths spread over the list (manifests list one class first), leaving out ``skip``."""
    kept = [p for p in paths if p not in skip]
    step = max(1, len(kept) // max(n, 1))
    return kept[::step][:n]


def weights_for(backbone: str):
    return str(VGG16_WEIGHTS) if backbone == "vgg16" else None


def decoded(paths: list[str], settings: ExtractorSettings, weights) -> np.ndarray:
    """The images as the extractor decodes them (uint8, the backbone's input size)."""
    config, resolved = settings.replace(precision="float32", runtime="keras").resolve(weights)
    out = [d.pixels for _, d in FeatureEngine(config, resolved).iter_decoded(paths) if d.pixels is not None]
    return np.stack(out)


def runner(settings: ExtractorSettings, weights, precision: str, runtime: str, quantized=None, hint: str = "f32"):
    config, resolved = settings.replace(precision=precision, runtime=runtime, quantized=quantized).resolve(weights)
    _runtimes.INT8_PRECISION_HINT = hint  # read when an int8 runner compiles
    try:
        return _runtimes.build_runner(config, resolved)
    finally:
        _runtimes.INT8_PRECISION_HINT = "f32"


def paths_of(settings, weights, quantized) -> dict:
    """name -> runner, the paths this CPU has."""
    hw = Hardware.detect()
    paths = {"float32/keras": runner(settings, weights, "float32", "keras"),
             "float32/openvino": runner(settings, weights, "float32", "openvino")}
    if hw.cpu_bfloat16:
        paths["bfloat16/openvino"] = runner(settings, weights, "bfloat16", "openvino")
    for hint in HINTS if hw.cpu_bfloat16 else ("f32",):
        paths[f"int8/openvino ({hint} hint)"] = runner(settings, weights, "int8", "openvino", quantized, hint)
    return paths


def timed(paths: dict, images: np.ndarray, repeats: int) -> tuple[dict, dict]:
    """Images/s (median of ``repeats``, paths interleaved) and each path's features."""
    features, seconds = time_interleaved(paths, images, repeats)
    rows = {name: {"images_per_s": round(len(images) / statistics.median(s), 2), "runs_s": [round(x, 3) for x in s]}
            for name, s in seconds.items()}
    return rows, features


def extract_end_to_end(paths: list[str], settings: ExtractorSettings, weights, quantized, repeats: int) -> dict:
    """int8 ``extract`` (hash, decode, forward, store) of the files into a fresh store each repeat."""
    rates = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            fs = extract(paths, store=Path(tmp) / "store", weights=weights, progress=False,
                         **{**settings.given(), "quantized": quantized})
            rates.append(len(fs) / (time.perf_counter() - t))
    return {"images_per_s": round(statistics.median(rates), 2), "runs": [round(r, 2) for r in rates]}


def speed_one(backbone: str, args, work: Path) -> dict:
    settings = ExtractorSettings(backbone=backbone)
    weights = weights_for(backbone)
    files = spread(manifest_paths(FRACATLAS), args.n)
    calibration = spread(manifest_paths(FRACATLAS), args.calibration_images, skip=set(files))
    folder = work / f"{backbone}-int8"
    t = time.perf_counter()
    record = quantize(calibration, folder, backbone=backbone, weights=weights, n=args.calibration_images)
    quantize_s = time.perf_counter() - t
    images = decoded(files, settings, weights)
    rows, features = timed(paths_of(settings, weights, str(folder)), images, args.repeats)
    for name, row in rows.items():
        row["min_cosine"] = round(float(cosine_per_image(features[name], features["float32/keras"]).min()), 5)
    int8 = max((r["images_per_s"], n) for n, r in rows.items() if n.startswith("int8"))
    ratios = {"int8/float32_openvino": round(int8[0] / rows["float32/openvino"]["images_per_s"], 2),
              "int8/float32_keras": round(int8[0] / rows["float32/keras"]["images_per_s"], 2)}
    if "bfloat16/openvino" in rows:
        ratios["int8/bfloat16_openvino"] = round(int8[0] / rows["bfloat16/openvino"]["images_per_s"], 2)
    e2e_files = spread(manifest_paths(FRACATLAS), args.e2e_n, skip=set(calibration))
    e2e = extract_end_to_end(e2e_files, settings, weights, str(folder), args.repeats)
    out = {"backbone": backbone, "weights": "imagenet (real)" if weights else "random (seeded)",
           "image_size": int(images.shape[1]), "images": len(images), "forward": rows, "fastest_int8": int8[1],
           "ratios": ratios, "int8_extract_end_to_end": e2e, "quantize_seconds": round(quantize_s, 1),
           "calibration_images": record["calibration"]["n_used"], "nncf_version": record["nncf_version"]}
    print(json.dumps({k: out[k] for k in ("backbone", "ratios", "int8_extract_end_to_end")}), flush=True)
    for name, row in rows.items():
        print(f"  {name:<26} {row['images_per_s']:>8.2f} img/s  min cosine {row['min_cosine']:.5f}", flush=True)
    return out


def cmd_speed(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {"load_average_before": os.getloadavg(),
                "backbones": [speed_one(b, args, Path(tmp)) for b in args.backbones.split(",")],
                "load_average_after": os.getloadavg()}


def cmd_agreement(args) -> dict:
    record = json.loads((Path(args.quantized) / "quantization.json").read_text())
    used = {im["path"] for im in record["calibration"]["images"]}
    settings = ExtractorSettings(**{k: v for k, v in record["settings"].items()})
    weights = record["weights_path"] or None
    sets = {"fracatlas": spread(manifest_paths(FRACATLAS), args.fracatlas, skip=used),
            "hbfmid": spread(manifest_paths(HBFMID, use_only=False), args.hbfmid, skip=used)}
    reference = runner(settings, weights, "float32", "keras")
    hints = HINTS if Hardware.detect().cpu_bfloat16 else ("f32",)
    others = {f"int8 ({h} hint)": runner(settings, weights, "int8", "openvino", args.quantized, h) for h in hints}
    if Hardware.detect().cpu_bfloat16:
        others["bfloat16/openvino"] = runner(settings, weights, "bfloat16", "openvino")
    out = {"quantized": record["identity"], "calibration_images": record["calibration"]["n_used"],
           "nncf_options": record["nncf_options"], "sets": {}}
    for name, paths in sets.items():
        images = decoded(paths, settings, weights)
        ref = reference(images)
        rows = {}
        for label, run in others.items():
            cos = cosine_per_image(run(images), ref)
            rows[label] = {"min": round(float(cos.min()), 5), "p01": round(float(np.quantile(cos, 0.01)), 5),
                           "median": round(float(np.median(cos)), 5), "mean": round(float(cos.mean()), 5)}
            print(f"{name} ({len(images)} images) {label}: {rows[label]}", flush=True)
        out["sets"][name] = {"images": len(images), "cosine_to_float32_keras": rows}
    return out


def cmd_accuracy(args) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import accuracy

    if args.quantized:
        accuracy.EXTRACTORS["avg"] = dict(pooling="avg", quantized=args.quantized)
    else:
        accuracy.EXTRACTORS["avg"] = dict(pooling="avg", precision="float32", runtime="openvino")
    accuracy.main(["--store", str(args.store), "--methods", "svm-avg", "--trials", str(args.trials),
                   "--inner-cv", str(args.inner_cv), "--out", str(args.out)])
    report = json.loads(Path(args.out).read_text())
    report["command"] = "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--backbones", default="vgg16,resnet50,efficientnetb2")
    s.add_argument("--n", type=int, default=48, help="timed images per batch (real FracAtlas radiographs)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--e2e-n", type=int, default=96, help="image files per int8 extract (a fresh store each repeat)")
    s.add_argument("--calibration-images", type=int, default=64, help="images each backbone is quantized on")
    s.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8.json")
    a = sub.add_parser("agreement")
    a.add_argument("--quantized", required=True)
    a.add_argument("--fracatlas", type=int, default=200)
    a.add_argument("--hbfmid", type=int, default=100)
    a.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8_agreement.json")
    c = sub.add_parser("accuracy")
    c.add_argument("--quantized", default=None, help="int8 model folder (else float32 OpenVINO features)")
    c.add_argument("--store", type=Path, required=True)
    c.add_argument("--trials", type=int, default=10)
    c.add_argument("--inner-cv", type=int, default=3)
    c.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    result = {"speed": cmd_speed, "agreement": cmd_agreement, "accuracy": cmd_accuracy}[args.command](args)
    if args.command != "accuracy":
        report = {"command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
                  "wall_seconds": round(time.perf_counter() - t, 1), "machine": describe_machine(), **result}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
