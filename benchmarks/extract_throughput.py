"""Extraction throughput: the seed recipes' per-image loop vs fracfeat, per backbone, side by side.

For each backbone, on the same FracAtlas JPEGs, in one run:

- ``baseline``: the seed recipes' way: each file opened at full size with PIL, resized, preprocessed,
  ``model.predict`` on one image at a time, float32 Keras (decode + predict, per image);
- ``extract``: ``fracfeat.extract`` end to end (files in, store version out, a fresh store each
  repeat, default settings: "auto" precision/runtime, engine-chosen batch size), model setup included,
  and as a share of the chosen path's forward-only rate;
- ``forward``: forward-only on already decoded uint8 batches, for float32 Keras and every other path
  asked for (default: float32 OpenVINO and whatever "auto" picks), to show what decoding and I/O cost;
- ``decode``: fracfeat's decode pipeline alone (threads, JPEG draft mode);
- ``keras_predict``: Keras' own batched ``model.predict`` (batch 32, float32) of the same feature model
  on the same decoded images, as a Keras user would call it;
- ``peer``: what a PyTorch user would run instead: torchvision's vgg16 / resnet50 / efficientnet_b2
  (same architecture and input size; random weights, no downloads here: the same FLOPs as fracfeat's
  real or random ones) cut to the global-average-pooled last convolution map, fed by a
  ``torch.utils.data.DataLoader`` over the files (PIL decode + torchvision transforms, one worker per
  core), ``torch.inference_mode()``, float32 and ``torch.autocast("cpu", torch.bfloat16)`` where the
  CPU has bfloat16 units, ``torch.set_num_threads`` left at its default (printed): end to end from the
  files (model construction excluded, which favours the peer) and forward-only on a pre-decoded batch.
  It runs in a child process of ``--peer-python`` (default: this interpreter), so torch can live in a
  separate venv; without torch/torchvision there it is skipped with the reason printed;
- ``roofline``: GFLOP per image of each backbone and this CPU's ceilings measured per precision
  (``roofline.py``: GEMMs on TensorFlow's and OpenVINO's kernels), so each forward path reports the share
  of the ceiling *of its own precision* it reaches and the images/s that ceiling allows (on a GPU: the
  share of its nominal tensor-core peak). The CPU model and flags it ran on are printed first.

Medians over repeats, ratios against the baseline. Peak RSS of a whole ``extract`` run is measured in a
child process per size (``--rss 400,4000``), reading its VmHWM, to show memory stays flat.

    python benchmarks/extract_throughput.py                       # all three backbones, ~15 min on 2 cores
    python benchmarks/extract_throughput.py --backbones resnet50 --n 32 --repeats 2 --rss ""   # quick look
    python benchmarks/extract_throughput.py --backbones "" --out benchmarks/results/extract_rss.json  # RSS only
    python benchmarks/extract_throughput.py --rss "" --peer-python /work/torchvenv/bin/python  # with the peer

Writes ``benchmarks/results/extract_throughput.json`` (``--out``). Needs ../shared/data/fracatlas
(``FRACFEAT_SHARED``); VGG16 uses the real ImageNet weights from ../shared/weights, the others
seeded random weights (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
SHARED = Path(os.environ.get("FRACFEAT_SHARED", REPO.parent / "shared")).resolve()
FRACATLAS = SHARED / "data" / "fracatlas"
VGG16_WEIGHTS = SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"

import numpy as np  # noqa: E402
from roofline import gflop_per_image, gpu_peak_tflops, measured_ceilings  # noqa: E402


def image_paths(n: int) -> list[str]:
    """The first ``n`` clean FracAtlas JPEGs (use=1: no truncated files, which the seed loop cannot open)."""
    with open(FRACATLAS / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["use"] == "1"]
    if n > len(rows):
        raise SystemExit(f"asked for {n} images; {FRACATLAS} has {len(rows)} clean ones")
    return [str(FRACATLAS / r["path"]) for r in rows[:n]]


def weights_for(backbone: str):
    return str(VGG16_WEIGHTS) if backbone == "vgg16" else None


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_rate(n_images: int, seconds: list[float]) -> dict:
    med = statistics.median(seconds)
    return {"images_per_s": round(n_images / med, 2), "median_s": round(med, 3), "runs_s": [round(s, 3) for s in seconds]}


def bench_baseline(backbone: str, paths: list[str], repeats: int) -> dict:
    """The seed recipes' loop: PIL full-size open, resize, preprocess, predict one image at a time."""
    import importlib

    import keras
    from PIL import Image

    from fracfeat._backbones import backbone_spec

    spec = backbone_spec(backbone)
    module = importlib.import_module(f"keras.applications.{spec.keras_module}")
    size = spec.default_size
    keras.config.set_dtype_policy("float32")
    model = getattr(module, spec.keras_constructor)(include_top=False, weights=None, pooling="avg",
                                                     input_shape=(size, size, 3))
    if backbone == "vgg16":
        model.load_weights(str(VGG16_WEIGHTS))

    def run():
        predict_s = 0.0
        for p in paths:
            img = Image.open(p).convert("RGB").resize((size, size))
            x = module.preprocess_input(np.asarray(img, dtype="float32")[None])
            t = time.perf_counter()
            model.predict(x, verbose=0)
            predict_s += time.perf_counter() - t
        return predict_s

    run()  # warm-up: graph tracing
    totals, predicts = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        predicts.append(run())
        totals.append(time.perf_counter() - t)
    out = median_rate(len(paths), totals)
    out["predict_only_images_per_s"] = round(len(paths) / statistics.median(predicts), 2)
    return out


def bench_extract(backbone: str, paths: list[str], repeats: int, workdir: Path) -> dict:
    """fracfeat.extract end to end into a fresh store per repeat (default settings)."""
    from fracfeat import extract

    extract(paths[:4], backbone=backbone, weights=weights_for(backbone), store=workdir / "warmup", progress=False)
    seconds, compute = [], []
    for r in range(repeats):
        t = time.perf_counter()
        fs = extract(paths, backbone=backbone, weights=weights_for(backbone), store=workdir / f"store{r}",
                     progress=False)
        seconds.append(time.perf_counter() - t)
        compute.append(fs.provenance["compute_seconds"])
        assert len(fs) == len(paths), f"{len(paths) - len(fs)} images failed: {fs.failures[:3]}"
    return {**median_rate(len(paths), seconds), "precision": fs.provenance["precision"],
            "runtime": fs.provenance["runtime"], "compute_seconds_median": round(statistics.median(compute), 3)}


def decoded_batch(backbone: str, paths: list[str], repeats: int) -> tuple[np.ndarray, dict]:
    from fracfeat._config import resolve_extractor
    from fracfeat._engine import FeatureEngine

    config, resolved = resolve_extractor(backbone, None, precision="float32", runtime="keras")
    engine = FeatureEngine(config, resolved)
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        pixels = np.stack([d.pixels for _, d in engine.iter_decoded(paths)])
        seconds.append(time.perf_counter() - t)
    return pixels, median_rate(len(paths), seconds)


def bench_keras_predict(backbone: str, pixels: np.ndarray, repeats: int, batch_size: int) -> dict:
    """Keras' own ``model.predict`` (float32) of the feature model fracfeat builds, on the decoded images."""
    from fracfeat._config import resolve_extractor
    from fracfeat._engine import FeatureEngine

    config, resolved = resolve_extractor(backbone, weights_for(backbone), precision="float32", runtime="keras")
    model = FeatureEngine(config, resolved).runner.model
    model.predict(pixels[:batch_size], batch_size=batch_size, verbose=0)  # warm-up: graph tracing
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict(pixels, batch_size=batch_size, verbose=0)
        seconds.append(time.perf_counter() - t)
    return {**median_rate(len(pixels), seconds), "batch_size": batch_size, "precision": "float32"}


TORCHVISION_MODELS = {"vgg16": "vgg16", "resnet50": "resnet50", "efficientnetb2": "efficientnet_b2"}


def torch_feature_model(backbone: str):
    """torchvision's architecture with random weights, cut to the global-average-pooled last conv map
    (the features fracfeat's default avg pooling gives: 512, 2048 and 1408 per image)."""
    import torch
    import torchvision

    model = getattr(torchvision.models, TORCHVISION_MODELS[backbone])(weights=None)
    if backbone == "vgg16":
        model = torch.nn.Sequential(model.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    elif backbone == "resnet50":
        model.fc = torch.nn.Identity()
    else:
        model.classifier = torch.nn.Identity()
    return model.eval()


class ImageFiles:
    """The map-style dataset a PyTorch user writes: each file decoded by PIL, then torchvision transforms."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def peer_child(backbone: str, n: int, repeats: int, batch_size: int, bf16: bool) -> None:
    """The PyTorch peer, run in ``--peer-python``: prints its rates as JSON (or why it was skipped)."""
    import contextlib

    try:
        import torch
        import torchvision
        from torchvision import transforms
    except ImportError as e:
        print(json.dumps({"skipped": f"{sys.executable} cannot import torch/torchvision ({e}); install them in a "
                                     f"venv that sees the system packages and pass --peer-python"}))
        return
    from fracfeat._backbones import backbone_spec

    size = backbone_spec(backbone).default_size
    model = torch_feature_model(backbone)
    to_input = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                   transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    workers = os.cpu_count() or 1
    loader = torch.utils.data.DataLoader(ImageFiles(image_paths(n), to_input), batch_size=batch_size,
                                         num_workers=workers)
    decoded = torch.cat(list(loader))
    out = {"n_images": n, "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
           "num_threads": torch.get_num_threads(), "num_workers": workers, "image_size": size,
           "n_features": int(model(decoded[:1]).shape[1])}

    def run(batches, precision: str) -> None:
        bf16 = precision == "bfloat16"
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            for batch in batches:
                model(batch)

    for precision in ["float32", *(["bfloat16"] if bf16 else [])]:
        run([decoded[:batch_size]], precision)  # warm-up (oneDNN primitives)
        forward_s, e2e_s = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            run(decoded.split(batch_size), precision)
            forward_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            run(loader, precision)
            e2e_s.append(time.perf_counter() - t)
        out[precision] = {"e2e": median_rate(n, e2e_s), "forward": median_rate(n, forward_s)}
    print(json.dumps(out))


def bench_peer(backbone: str, n: int, repeats: int, batch_size: int, peer_python: str) -> dict:
    """The PyTorch peer in a child process of ``peer_python`` (its own venv may hold torch)."""
    from fracfeat._hardware import cpu_has_bf16

    cmd = [peer_python, __file__, "--peer-child", backbone, "--n", str(n), "--repeats", str(repeats),
           "--batch-size", str(batch_size), *(["--peer-bf16"] if cpu_has_bf16() else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"the peer's child process failed (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def bench_forward(backbone: str, pixels: np.ndarray, path: tuple[str, str], repeats: int, batch_size: int) -> dict:
    """Forward-only on decoded uint8 batches through the engine (the code extract runs)."""
    from fracfeat._config import resolve_extractor
    from fracfeat._engine import FeatureEngine

    precision, runtime = path
    config, resolved = resolve_extractor(backbone, weights_for(backbone), precision=precision, runtime=runtime)
    engine = FeatureEngine(config, resolved)
    t = time.perf_counter()
    engine.forward(pixels[:batch_size])  # build/compile + warm-up
    setup = time.perf_counter() - t
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        for start in range(0, len(pixels), batch_size):
            engine.forward(pixels[start:start + batch_size])
        seconds.append(time.perf_counter() - t)
    out = median_rate(len(pixels), seconds)
    out.update(precision=config.precision, runtime=config.runtime, batch_size=batch_size,
               setup_s=round(setup, 2))
    return out


def _share(rate: float, r: dict, precision: str) -> str:
    ceiling = r.get("ceiling_images_per_s", {}).get(precision)
    return f" ({rate / ceiling:.0%} of the {precision} ceiling)" if ceiling else ""


def print_comparison(backbone: str, r: dict) -> None:
    """fracfeat against what a user would run instead, side by side, and the ratios (kept in ``r``)."""
    chosen = r["forward"].get(r.get("auto_path", ""))
    e2e = r["extract"]["images_per_s"]
    c = r["comparison"] = {"keras_predict": r["keras_predict"]["images_per_s"],
                           "extract_over_keras_predict": round(e2e / r["keras_predict"]["images_per_s"], 2)}
    print(f"  {backbone} side by side (images/s, the same {r['gflop_per_image']:.2f} GFLOP/image for every model):")
    if chosen:
        c.update(extract_over_forward=round(e2e / chosen["images_per_s"], 3))
        print(f"    fracfeat extract e2e {e2e:.2f} = {c['extract_over_forward']:.0%} of its path's forward-only "
              f"{chosen['images_per_s']:.2f} ({r['auto_path']})")
    print(f"    Keras model.predict {c['keras_predict']:.2f} (forward only): extract / predict "
          f"{c['extract_over_keras_predict']:.2f}x")
    peer = r["peer"]
    if "skipped" in peer:
        print(f"    PyTorch peer skipped: {peer['skipped']}", flush=True)
        return
    print(f"    PyTorch peer on the first {peer['n_images']} of the same images:")
    for precision in ("float32", "bfloat16"):
        if precision in peer:
            e, f = peer[precision]["e2e"]["images_per_s"], peer[precision]["forward"]["images_per_s"]
            print(f"    torch {precision:8s} e2e {e:.2f}, forward {f:.2f}{_share(f, r, precision)}")
    best = max(peer[p]["e2e"]["images_per_s"] for p in ("float32", "bfloat16") if p in peer)
    c["extract_over_best_peer_e2e"] = round(e2e / best, 2)
    print(f"    fracfeat e2e / best torch e2e {c['extract_over_best_peer_e2e']:.2f}x (goal >= 1.5x); torch "
          f"{peer['torch_version']}, torchvision {peer['torchvision_version']}, {peer['num_threads']} threads "
          f"(torch's default), DataLoader {peer['num_workers']} workers; random weights (torchvision, no "
          f"downloads): the FLOPs are those of fracfeat's real or random weights", flush=True)


def compute_ceilings(repeats: int) -> tuple[dict[str, float], str]:
    """({precision: GFLOP/s}, what they are): a known GPU's nominal tensor-core peak for every precision,
    else this CPU's GEMM ceilings measured per precision (roofline.measured_ceilings)."""
    from fracfeat._hardware import has_gpu

    if has_gpu():
        gpu = gpu_peak_tflops()
        if not gpu:
            return {}, ""
        peak = dict.fromkeys(("float32", "bfloat16", "float16"), gpu[1] * 1000)
        return peak, f"{gpu[0]} nominal dense bf16/fp16 peak"
    measured = measured_ceilings(repeats)
    how = "; ".join(f"{p} {c['gflop_per_s']:.0f} GFLOP/s ({c['library']} GEMM {c['shape']})"
                    for p, c in measured["ceilings"].items())
    return ({p: c["gflop_per_s"] for p, c in measured["ceilings"].items()},
            f"measured GEMM ceilings per precision (load average {' '.join(map(str, measured['load_avg']))}): {how}")


def peak_rss_kb() -> int:
    """This process's peak resident set size in kB.

    Linux's VmHWM, not ru_maxrss: the kernel carries the parent's high-water mark into a child's
    ru_maxrss across fork+exec, so a child of a 2 GB benchmark process would report 2 GB whatever it did.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_child(backbone: str, n: int, image_size: int | None, store: str) -> None:
    """Run one extract and print its peak RSS (this process's ru_maxrss) as JSON."""
    from fracfeat import extract

    t = time.perf_counter()
    fs = extract(image_paths(n), backbone=backbone, weights=weights_for(backbone), image_size=image_size,
                 store=store, progress=False)
    seconds = time.perf_counter() - t
    print(json.dumps({"n_images": n, "n_rows": len(fs), "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
                      "seconds": round(seconds, 1), "precision": fs.provenance["precision"],
                      "runtime": fs.provenance["runtime"], "image_size": fs.provenance["image_size"]}))


def bench_rss(backbone: str, sizes: list[int], image_size: int | None, workdir: Path) -> list[dict]:
    out = []
    for n in [8, *sizes]:  # the first, uncounted run fills the compiled-model cache as a user's first run does
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--backbones", backbone,
               "--store", str(workdir / f"rss{n}")]
        if image_size:
            cmd += ["--image-size", str(image_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if n == 8 and len(out) == 1:
            out.pop()
            continue
        print(f"  peak RSS, {n} images: {out[-1]['peak_rss_mb']} MB ({out[-1]['seconds']} s)", flush=True)
    return out


def bench_backbone(backbone: str, paths: list[str], args, ceilings: dict, work: Path) -> dict:
    """Every measurement of one backbone, printed as it comes; the results as a dict."""
    r: dict = {}
    print(f"{backbone}:", flush=True)
    r["baseline"] = bench_baseline(backbone, paths[:args.baseline_n], args.repeats)
    print(f"  baseline (seed loop)  {r['baseline']['images_per_s']:7.2f} img/s", flush=True)
    r["extract"] = bench_extract(backbone, paths, args.repeats, work / backbone)
    print(f"  extract end to end    {r['extract']['images_per_s']:7.2f} img/s "
          f"({r['extract']['precision']}/{r['extract']['runtime']})", flush=True)
    pixels, r["decode"] = decoded_batch(backbone, paths, args.repeats)
    print(f"  decode only           {r['decode']['images_per_s']:7.2f} img/s", flush=True)
    peer_n = min(args.peer_n, args.n)
    r["keras_predict"] = bench_keras_predict(backbone, pixels[:peer_n], args.repeats, args.batch_size)
    print(f"  Keras model.predict   {r['keras_predict']['images_per_s']:7.2f} img/s (float32, "
          f"batch {args.batch_size}, the first {peer_n} decoded images)", flush=True)
    r["forward"] = {}
    r["gflop_per_image"] = round(gflop_per_image(backbone), 3)
    for spec in args.paths.split(","):
        fwd = bench_forward(backbone, pixels, tuple(spec.split(":")), args.repeats, args.batch_size)
        key = f"{fwd['precision']}/{fwd['runtime']}"
        if spec == "auto:auto":
            r["auto_path"] = key
        if key in r["forward"]:
            continue
        r["forward"][key] = fwd
        share = ""
        if fwd["precision"] in ceilings:
            ceiling = ceilings[fwd["precision"]]
            fwd["share_of_ceiling"] = round(fwd["images_per_s"] * r["gflop_per_image"] / ceiling, 3)
            share = f" ({fwd['share_of_ceiling']:.0%} of the {fwd['precision']} ceiling)"
        print(f"  forward {key:17s} {fwd['images_per_s']:7.2f} img/s{share}", flush=True)
    if ceilings:
        r["ceiling_images_per_s"] = {p: round(g / r["gflop_per_image"], 1) for p, g in ceilings.items()}
        print(f"  ceilings at {r['gflop_per_image']:.2f} GFLOP/image: "
              + ", ".join(f"{p} {v:.2f} img/s" for p, v in r["ceiling_images_per_s"].items()), flush=True)
    base = r["baseline"]["images_per_s"]
    r["ratios_vs_baseline"] = {"extract": round(r["extract"]["images_per_s"] / base, 2),
                               **{f"forward {k}": round(v["images_per_s"] / base, 2) for k, v in r["forward"].items()}}
    print(f"  extract / baseline    {r['ratios_vs_baseline']['extract']:7.2f}x", flush=True)
    r["peer"] = bench_peer(backbone, peer_n, args.repeats, args.batch_size, args.peer_python) \
        if args.peer_python else {"skipped": "--peer-python ''"}
    print_comparison(backbone, r)
    return r


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="vgg16,resnet50,efficientnetb2")
    ap.add_argument("--n", type=int, default=96, help="images for extract / forward / decode (default 96)")
    ap.add_argument("--baseline-n", type=int, default=16, help="images for the per-image seed loop (default 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="forward-only batch size")
    ap.add_argument("--paths", default="float32:keras,float32:openvino,auto:auto",
                    help="forward-only paths as precision:runtime, comma separated")
    ap.add_argument("--rss", default="400,4000", help="image counts for the peak-RSS runs ('' to skip)")
    ap.add_argument("--rss-backbone", default="resnet50")
    ap.add_argument("--rss-image-size", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "extract_throughput.json"))
    ap.add_argument("--peer-n", type=int, default=32,
                    help="images for Keras' predict and the PyTorch peer: the first of the same images (default 32)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter with torch + torchvision for the PyTorch peer (default: this one; '' to skip)")
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--peer-child", help=argparse.SUPPRESS)
    ap.add_argument("--peer-bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        return rss_child(args.backbones, args.rss_child, args.image_size, args.store)
    if args.peer_child:
        return peer_child(args.peer_child, args.n, args.repeats, args.batch_size, args.peer_bf16)
    if not (FRACATLAS / "manifest.csv").is_file():
        raise SystemExit(f"FracAtlas not found at {FRACATLAS}: set FRACFEAT_SHARED to the shared/ folder")

    from fracfeat._hardware import describe_machine

    paths = image_paths(args.n) if args.backbones else []
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_avg_start": load_avg(),
        "machine": describe_machine(),
        "n_images": args.n, "baseline_n_images": args.baseline_n, "repeats": args.repeats, "backbones": {},
    }
    machine = result["machine"]
    print(f"CPU: {machine['cpu']}, {machine['cpu_count']} cores, flags {' '.join(machine['cpu_flags'])}", flush=True)
    print(f"load average {result['load_avg_start']}; {args.n} images, {args.repeats} repeats", flush=True)
    ceilings, ceilings_how = compute_ceilings(args.repeats) if args.backbones else ({}, "")
    if ceilings:
        result["roofline"] = {"ceilings": ceilings_how, "gflop_per_s": ceilings}
        print(f"ceilings: {ceilings_how}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fracfeat-bench-") as tmp:
        work = Path(tmp)
        for backbone in [b for b in args.backbones.split(",") if b]:
            result["backbones"][backbone] = bench_backbone(backbone, paths, args, ceilings, work)
        if args.rss:
            sizes = [int(s) for s in args.rss.split(",")]
            print(f"peak RSS of extract ({args.rss_backbone}), one child process per size:", flush=True)
            result["peak_rss"] = {"backbone": args.rss_backbone,
                                  "runs": bench_rss(args.rss_backbone, sizes, args.rss_image_size, work)}
    result["load_avg_end"] = load_avg()
    result["gpu_figures"] = "none: no GPU on this machine" if not result["machine"]["gpu"] else "see forward/extract"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average at the end {result['load_avg_end']}; wrote {args.out}")


if __name__ == "__main__":
    main()
