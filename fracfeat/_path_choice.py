"""The "auto" extraction path, chosen by measurement on this machine and cached.

For a backbone and its input size (and the settings that change the model: pooling, tapped layers,
the layer cut, the weights), :func:`calibrate` times every candidate path (Keras and OpenVINO, in
float32 and, where the CPU does it in hardware, bfloat16) on a few synthetic radiograph-like images,
checks each one's features against float32 Keras (cosine similarity per image, :data:`MIN_COSINE`),
and keeps the fastest that agrees. The decision is one entry of a JSON file in the cache folder
(:func:`fracfeat._runtimes.cache_dir`), keyed by the CPU (model, speed-relevant flags, cores), the
library versions (TensorFlow, Keras, OpenVINO) and the backbone settings; so "auto" resolves to the
same path run after run, and the store's cache keeps hitting, until one of those changes.

When "auto" calibrates on its own (:func:`calibrated_path`, environment variable
``FRACFEAT_CALIBRATE``):

- ``auto`` (default): a cached decision is used; without one, the first extraction calibrates when
  both precision and runtime are "auto", the CPU runs the model (no GPU), the weights are real and the
  input is at least :data:`MIN_AUTO_CALIBRATION_SIDE` px. Elsewhere the hand tables of
  :mod:`fracfeat._hardware` decide: random weights (tests, speed checks) and tiny inputs (where a whole
  extraction is cheap next to building four models) are not worth a calibration, and a forced precision
  or runtime only filters a cached decision's rows.
- ``always``: calibrate on first use at every input size (real weights still required).
- ``off``: the hand tables only, as before calibration existed.

int8 (a model :func:`fracfeat.quantize` made from the user's images, ``quantized=DIR``) is timed only
beside that model (``calibrate(quantized=DIR)``, ``fracfeat calibrate --quantized DIR``) and "auto"
never picks it: its features depend on the calibration images the user chose. Its bound,
``MIN_COSINE["int8"] = 0.98``, comes from VGG16 (ImageNet weights, 224 px) quantized by NNCF 3.4.0
(preset performance, fast bias correction) on 300 FracAtlas radiographs: per-image cosine to float32
Keras on 200 other FracAtlas images min 0.9936, 1st percentile 0.9952, median 0.9991; on 100 HBFMID
images (another source) min 0.9878, 1st percentile 0.9903, median 0.9992 (bfloat16/openvino on the
same images: min 0.9999). 0.98 sits below every image measured, so a sound int8 model agrees and a
broken one does not (``python benchmarks/int8.py agreement``, benchmarks/results/int8_agreement.json).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from filelock import FileLock

from ._backbones import BackboneSpec, backbone_spec
from ._config import ExtractorSettings
from ._errors import ConfigError
from ._hardware import Hardware, cpu_flags, cpuinfo_field, speed_flags
from ._runtimes import build_runner, cache_dir

log = logging.getLogger("fracfeat")

CACHE_FILE = "path-choices.json"
CACHE_SCHEMA = 1
ENV = "FRACFEAT_CALIBRATE"
MODES = ("auto", "always", "off")
# Below this side "auto" keeps the tables unless a decision is cached (or FRACFEAT_CALIBRATE=always).
MIN_AUTO_CALIBRATION_SIDE = 160
# Per-image cosine similarity to float32 Keras a candidate must reach, per precision (int8: measured in
# the module docstring).
MIN_COSINE = {"float32": 0.999, "bfloat16": 0.999, "int8": 0.98}
REFERENCE = ("float32", "keras")
DEFAULT_IMAGES = 16  # a multiple of every runner's fixed chunk (Keras 8, OpenVINO 4 per request)
DEFAULT_REPEATS = 3
LIBRARIES = ("tensorflow", "keras", "openvino")


def mode() -> str:
    """FRACFEAT_CALIBRATE's value (default "auto"); a ConfigError naming the choices for any other."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{ENV}={value!r} is not one of {', '.join(MODES)}: unset it or pick one")
    return value


def candidate_paths(hardware: Hardware | None = None) -> list[tuple[str, str]]:
    """(precision, runtime) pairs worth timing on this CPU, float32 Keras (the reference) first."""
    hw = Hardware.detect() if hardware is None else hardware
    precisions = ["float32"] + (["bfloat16"] if hw.cpu_bfloat16 else [])
    # int8 is not a candidate of its own: its features depend on the calibration images the user chose, so
    # it is timed only beside the user's model (calibrate(quantized=DIR)) and never picked by "auto" (choose).
    runtimes = ["keras"] + (["openvino"] if hw.openvino else [])
    return [(p, r) for p in precisions for r in runtimes]


def machine_key() -> dict:
    """What the speed ranking depends on in the machine: CPU model, its speed-relevant flags, cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpuinfo_field("model name"), "cpu_flags": speed_flags(cpu_flags()), "cores": cores}


def library_versions() -> dict:
    """Installed TensorFlow, Keras and OpenVINO versions ("" where absent), read without importing them."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def backbone_key(spec: BackboneSpec, image_size: int, settings, identity: str) -> dict:
    """The settings that change the model run (not tiles, scales or views: the same model runs them)."""
    layers = settings.layers
    return {"backbone": spec.name, "image_size": int(image_size), "pooling": settings.pooling,
            "layers": list(layers) if isinstance(layers, (tuple, list)) else layers,
            "feature_layer": settings.feature_layer or "", "preprocessing": settings.preprocessing,
            "weights": identity}


def decision_key(backbone: dict, machine: dict | None = None, versions: dict | None = None) -> dict:
    return {"schema": CACHE_SCHEMA, "machine": machine_key() if machine is None else machine,
            "versions": library_versions() if versions is None else versions, "backbone": backbone}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cache_file() -> Path:
    return cache_dir() / CACHE_FILE


def read_decisions(path: Path | None = None) -> dict:
    """Every cached decision by key hash; {} when there is no file or it cannot be read (recalibrated)."""
    path = cache_file() if path is None else path
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable path-choice cache %s (%s)", path, e)
        return {}
    return data.get("decisions", {}) if isinstance(data, dict) and data.get("schema") == CACHE_SCHEMA else {}


def record_decision(decision: dict, path: Path | None = None) -> None:
    """Add ``decision`` to the cache file: read, merge and replace under the file's lock, so concurrent
    writers keep each other's entries and a reader always sees a whole file (atomic rename)."""
    path = cache_file() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=120):
        decisions = read_decisions(path)
        decisions[key_hash(decision["key"])] = decision
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"schema": CACHE_SCHEMA, "decisions": decisions}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def synthetic_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n`` deterministic radiograph-like uint8 RGB images: soft bright shapes on a dark, noisy ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = np.empty((n, side, side, 3), np.uint8)
    for i in range(n):
        img = np.zeros((side, side))
        for _ in range(5):
            (cx, cy), (sx, sy) = rng.uniform(0.15, 0.85, 2), rng.uniform(0.05, 0.35, 2)
            img += rng.uniform(0.3, 1.0) * np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
        img += rng.normal(0.0, 0.03, img.shape)
        out[i] = (np.clip(img / img.max(), 0.0, 1.0) * 255).astype(np.uint8)[..., None]
    return out


def cosine_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.abs(a - b).max(axis=1) == 0, 1.0, 0.0))


def agrees(row: dict, min_cosine: float | None = None) -> bool:
    bound = MIN_COSINE.get(row["precision"], 1.0) if min_cosine is None else min_cosine
    return row["min_cosine"] >= bound


def choose(rows: list[dict], precision: str = "auto", runtime: str = "auto",
           min_cosine: float | None = None) -> dict | None:
    """The fastest row that agrees with float32 Keras and matches a forced precision/runtime; None if none."""
    # int8 features depend on the calibration images the user chose: only ever by quantized= (never "auto").
    fits = [r for r in rows if agrees(r, min_cosine) and runtime in ("auto", r["runtime"])
            and (precision == r["precision"] or precision == "auto" and r["precision"] != "int8")]
    return max(fits, key=lambda r: r["images_per_s"]) if fits else None


def time_interleaved(runners: dict, images: np.ndarray, repeats: int) -> tuple[dict, dict]:
    """Each runner's features of ``images`` (its first call, also the warm-up: tracing, compilation) and the
    seconds of ``repeats`` more calls, the runners interleaved so load drifts hit them alike."""
    features = {name: run(images) for name, run in runners.items()}
    seconds = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t = time.perf_counter()
            run(images)
            seconds[name].append(time.perf_counter() - t)
    return features, seconds


def measure_paths(settings, weights, image_size: int, candidates: list[tuple[str, str]],
                  n_images: int = DEFAULT_IMAGES, repeats: int = DEFAULT_REPEATS) -> list[dict]:
    """Images/s (median of ``repeats``, candidates interleaved so load drifts hit them alike) and the
    lowest per-image cosine to float32 Keras of each candidate, on :func:`synthetic_images`."""
    if REFERENCE not in candidates:
        candidates = [REFERENCE, *candidates]
    images = synthetic_images(n_images, image_size)
    runners = {}
    for path in candidates:
        precision, runtime = path
        config, resolved = settings.replace(precision=precision, runtime=runtime, image_size=image_size, tiles=1,
                                            scales=None, view=None,
                                            quantized=settings.quantized if precision == "int8" else None,
                                            ).resolve(weights)
        runners[path] = build_runner(config, resolved)
    features, seconds = time_interleaved(runners, images, repeats)
    rows = []
    for precision, runtime in candidates:
        cos = cosine_per_image(features[precision, runtime], features[REFERENCE])
        rows.append({"path": f"{precision}/{runtime}", "precision": precision, "runtime": runtime,
                     "images_per_s": round(n_images / statistics.median(seconds[precision, runtime]), 2),
                     "runs_s": [round(s, 4) for s in seconds[precision, runtime]],
                     "min_cosine": round(float(cos.min()), 7)})
    for row in rows:
        row["agrees"] = agrees(row)
    return rows


def calibrate(backbone: str = "vgg16", weights="imagenet", image_size: int | None = None, *,
              n_images: int = DEFAULT_IMAGES, repeats: int = DEFAULT_REPEATS, candidates=None,
              machine: dict | None = None, versions: dict | None = None, **settings) -> dict:
    """Time every candidate path for this backbone here, record the decision, return it.

    Returns the decision: ``rows`` (path, images_per_s, min_cosine, agrees), ``chosen`` (the fastest
    path that agrees), ``key`` (machine, library versions, backbone settings), when and under what load
    it was measured. ``machine`` and ``versions`` override the detected ones (to file a decision for
    another key). Other keywords are extractor settings (pooling, layers, feature_layer, preprocessing).
    """
    if n_images < 1 or repeats < 1:
        raise ConfigError(f"calibrate needs at least 1 image and 1 repeat, got {n_images} and {repeats}: pass "
                          f"positive counts (defaults {DEFAULT_IMAGES} and {DEFAULT_REPEATS})")
    base = ExtractorSettings.from_kwargs("calibrate", backbone=backbone, image_size=image_size, **settings)
    config, resolved = base.replace(precision="float32", runtime="keras", quantized=None).resolve(weights)
    if base.quantized:  # the user's int8 model: its row beside the others (timed and checked alike)
        base.replace(precision="int8", runtime="openvino").resolve(weights, weights_identity=resolved.identity)
        candidates = [*(candidates or candidate_paths()), ("int8", "openvino")]
    return _measure_and_record(base, config.image_size, weights, resolved.identity, n_images=n_images,
                               repeats=repeats, candidates=candidates, machine=machine, versions=versions)


def _measure_and_record(settings, image_size: int, weights, identity: str, *, n_images: int = DEFAULT_IMAGES,
                        repeats: int = DEFAULT_REPEATS, candidates=None, machine=None, versions=None) -> dict:
    key = decision_key(backbone_key(backbone_spec(settings.backbone), image_size, settings, identity),
                       machine, versions)
    t = time.perf_counter()
    rows = measure_paths(settings, weights, image_size, candidates or candidate_paths(), n_images, repeats)
    best = choose(rows)
    decision = {"key": key, "rows": rows, "chosen": best["path"] if best else "",
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t, 1),
                "load_avg": [round(x, 2) for x in os.getloadavg()], "n_images": n_images, "repeats": repeats,
                "images": "synthetic"}
    record_decision(decision)
    log.info("calibrated %s at %d px: %s (%.0f s)", settings.backbone, image_size, decision["chosen"],
             decision["seconds"])
    return decision


def cached_decision(key: dict) -> dict | None:
    return read_decisions().get(key_hash(key))


def _calibrate_once(key: dict, settings, image_size: int, weights, identity: str, machine, versions) -> dict:
    cache_dir().mkdir(parents=True, exist_ok=True)
    # One process calibrates; the others wait for it and read its decision.
    with FileLock(str(cache_file()) + ".calibrating.lock"):
        decision = cached_decision(key)
        if decision is None:
            log.info("calibrating the fastest extraction path for %s at %d px on this machine (once; %s=off "
                     "skips it)", settings.backbone, image_size, ENV)
            decision = _measure_and_record(settings, image_size, weights, identity, machine=machine,
                                           versions=versions)
    return decision


def calibrated_path(spec: BackboneSpec, precision: str, runtime: str, *, settings, image_size: int, weights,
                    resolved, identity: str | None, machine: dict | None = None,
                    versions: dict | None = None) -> tuple[str, str] | None:
    """The cached (or, on first use where worth it, measured) path for "auto"; None: use the tables."""
    how = mode()
    identity = identity or (resolved.identity if resolved is not None else "")
    if how == "off" or identity.startswith("random") or Hardware.detect().gpu:
        return None
    key = decision_key(backbone_key(spec, image_size, settings, identity), machine, versions)
    decision = cached_decision(key)
    worth_it = (precision == runtime == "auto" and resolved is not None
                and (how == "always" or image_size >= MIN_AUTO_CALIBRATION_SIDE))
    if decision is None and worth_it:
        try:
            decision = _calibrate_once(key, settings, image_size, weights, identity, machine, versions)
        except OSError as e:  # an unwritable cache folder: no decision can be kept, so none is made
            log.warning("cannot keep a calibrated extraction path in %s (%s), so the built-in table chooses; "
                        "set FRACFEAT_CACHE_DIR to a writable folder", cache_dir(), e)
            return None
    if decision is None:
        return None
    best = choose(decision["rows"], precision, runtime)
    return (best["precision"], best["runtime"]) if best else None
