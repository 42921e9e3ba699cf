"""Issue 15 research: local evidence instead of global style (FracAtlas -> HBFMID), from cached VGG16 maps.

Hypothesis: a fracture is local (a few cells of the last convolution map) while a site's style (contrast,
noise, framing) is spread over the whole image. Average pooling mixes the two; poolings or heads that keep
local evidence and discard each image's global statistics might rank another site better.

Two steps:

1. ``--compute-maps``: one VGG16 pass (ImageNet weights, 224 px, bfloat16 Keras as extract runs it) over
   FracAtlas and HBFMID, decoded by fracfeat's own ``load_image`` / ``PixelRecipe`` (the pixels extract
   sees); the ``block5_conv3`` map (14x14x512, after ReLU) of every image is written as float16 to
   ``--maps`` (outside the repository: about 0.9 GB). ``block5_pool`` is its 2x2 max, derived here.
2. the measurement (default), end to end from the cached maps: every representation (pooling of
   block5_pool or block5_conv3, with or without per-image instance normalization) x head (logistic
   regression, RBF SVM), and a small MIL head (a linear 1x1 conv scoring each block5_pool cell, then max /
   top-k / attention pooling over the 49 cells) trained on the cached maps.

Protocol (fixed before looking at any result):

- **HBFMID**: trained on all of FracAtlas (use=1), scored on every HBFMID image; ROC AUC, and sensitivity /
  specificity at the threshold kept from FracAtlas out-of-fold predictions (Youden's J on the grouped
  5-fold OOF scores); 95% intervals by resampling HBFMID's groups. No HBFMID label is used in training or
  selection.
- **LORO**: each FracAtlas region part (shoulder > hip > leg > hand, as benchmarks/external.py) held out in
  turn, trained on the other three, scored on it (ROC AUC).
- **FracAtlas CV**: grouped 5-fold ROC AUC (pooled out-of-fold scores).
- **Site separability**: grouped 5-fold ROC AUC of a logistic regression telling FracAtlas from HBFMID.
- Rule: a method wins only if it beats the baseline (average pooling, same head) on HBFMID ROC AUC and on
  the mean LORO ROC AUC, and loses no more than 0.01 of FracAtlas CV.

Hyperparameters are fixed (standardized features; logreg C=0.1, as the issue-15 research scripts; SVM C=1,
gamma="scale"; both class-balanced; the MIL head's settings in ``MIL``), so no study is tuned per method.

    nice -n 15 python benchmarks/local_evidence.py --compute-maps --maps /work/research/s27_maps
    nice -n 15 python benchmarks/local_evidence.py --maps /work/research/s27_maps \
        --out benchmarks/results/local_evidence.json
    python benchmarks/local_evidence.py --table benchmarks/results/local_evidence*.json  # merge result files
    # smoke test, end to end on 60 rows per source:
    python benchmarks/local_evidence.py --compute-maps --limit 60 --maps /tmp/le_maps
    python benchmarks/local_evidence.py --maps /tmp/le_maps --out /tmp/le.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fracfeat._fit import choose_threshold  # noqa: E402
from fracfeat._hardware import describe_machine  # noqa: E402
from fracfeat._images import PixelRecipe, load_image  # noqa: E402
from fracfeat._runtimes import preprocess_in_graph  # noqa: E402
from fracfeat._validation import bootstrap_ci, grouped_folds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SOURCES = {"fracatlas": SHARED / "data" / "fracatlas", "hbfmid": SHARED / "data" / "hbfmid"}
WEIGHTS = SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"
REGION_ORDER = ("shoulder", "hip", "leg", "hand")
SIZE, MAP_SIDE, CHANNELS = 224, 14, 512


def region_part(region: str) -> str:
    """FracAtlas' region cell folded into one of 4 parts (as benchmarks/external.py folds it)."""
    return next((r for r in REGION_ORDER if r in region), "hand")


def manifest(source: str) -> list[dict]:
    """The source's manifest rows, each with an absolute ``file``, ``y`` (1 = fractured) and ``source``."""
    root = SOURCES[source]
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["file"] = str(root / r["path"])
        r["y"] = int(r["label"] == "fractured")
        r["source"] = source
        r.setdefault("use", "1")
        r.setdefault("region", "")
    return rows


def _map_model():
    """uint8 (n, 224, 224, 3) RGB -> block5_conv3 (n, 14, 14, 512), bfloat16 Keras, caffe preprocessing."""
    import keras
    from keras import ops

    keras.config.set_dtype_policy("mixed_bfloat16")
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    vgg.load_weights(str(WEIGHTS))
    inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
    x = preprocess_in_graph(ops, ops.cast(inputs, "float32"), "caffe")
    tap = keras.Model(vgg.input, vgg.get_layer("block5_conv3").output)
    return keras.Model(inputs, ops.cast(tap(x, training=False), "float32"))


def compute_maps(out: Path, limit: int = 0, batch: int = 16) -> None:
    """Every FracAtlas and HBFMID image's block5_conv3 map -> ``out``/maps.npy (float16), rows.csv; resumable.

    ``limit``: a seeded random ``limit`` rows of each source only (a smoke test's maps folder).
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for source in SOURCES:
        part = manifest(source)
        if limit:
            keep = np.sort(np.random.default_rng(0).choice(len(part), min(limit, len(part)), replace=False))
            part = [part[i] for i in keep]
        rows += part
    fields = ["file", "source", "y", "group", "region", "use", "error"]
    maps_path, done_path = out / "maps.npy", out / "done.txt"
    if maps_path.exists():
        maps = np.load(maps_path, mmap_mode="r+")
    else:
        maps = np.lib.format.open_memmap(maps_path, "w+", np.float16, (len(rows), MAP_SIDE, MAP_SIDE, CHANNELS))
    done = int(done_path.read_text()) if done_path.exists() else 0
    model, recipe = _map_model(), PixelRecipe(SIZE)
    t0, pool = time.perf_counter(), ThreadPoolExecutor(2)
    for start in range(done, len(rows), batch):
        chunk = rows[start:start + batch]
        decoded = list(pool.map(lambda r: load_image(r["file"], recipe), chunk))
        pixels = np.stack([d.pixels if d.pixels is not None else np.zeros((SIZE, SIZE, 3), np.uint8)
                           for d in decoded])
        with open(out / "errors.txt", "a") as f:
            f.writelines(f"{start + i}\t{d.error}\n" for i, d in enumerate(decoded) if d.error)
        maps[start:start + len(chunk)] = np.asarray(model(pixels, training=False)).astype(np.float16)
        maps.flush()
        done_path.write_text(str(start + len(chunk)))
        n = start + len(chunk) - done
        print(f"{start + len(chunk)}/{len(rows)}  {n / (time.perf_counter() - t0):.1f} images/s", flush=True)
    errors = {}
    if (out / "errors.txt").exists():
        errors = dict(line.rstrip("\n").split("\t", 1) for line in open(out / "errors.txt") if line.strip())
    with open(out / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**r, "error": errors.get(str(i), "")})
    (out / "timing.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "images": len(rows) - done}))


# ---------------------------------------------------------------- the cached maps -> feature vectors

def load_maps(folder: Path) -> tuple[np.ndarray, dict]:
    """(maps memmap (n, 14, 14, 512) float16, row columns as arrays) of the decoded rows; FracAtlas use=1 only."""
    with open(folder / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    maps = np.load(folder / "maps.npy", mmap_mode="r")
    keep = [i for i, r in enumerate(rows) if not r["error"] and (r["source"] != "fracatlas" or r["use"] == "1")]
    cols = {k: np.array([rows[i][k] for i in keep]) for k in ("source", "group", "region", "file")}
    cols["y"] = np.array([int(rows[i]["y"]) for i in keep])
    cols["group"] = np.char.add(np.char.add(cols["source"], ":"), cols["group"])
    cols["part"] = np.array([region_part(r) for r in cols["region"]])
    cols["index"] = np.array(keep)
    return maps, cols


def pool5(m: np.ndarray) -> np.ndarray:
    """block5_conv3 (n, 14, 14, c) -> block5_pool (n, 7, 7, c): VGG16's own 2x2 max pooling."""
    n, h, w, c = m.shape
    return m.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def instance_norm(m: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Each image's channels with their own spatial mean and std removed (the image's global statistics)."""
    mean, std = m.mean(axis=(1, 2), keepdims=True), m.std(axis=(1, 2), keepdims=True)
    return (m - mean) / (std + eps)


def gem(m: np.ndarray, p: float) -> np.ndarray:
    """Generalized mean over cells: p=1 is average pooling, p -> inf max pooling (maps are >= 0, post-ReLU)."""
    return np.power(np.power(np.maximum(m, 0), p).mean(axis=(1, 2)), 1.0 / p)


def top_k_mean(m: np.ndarray, k: int) -> np.ndarray:
    """Each channel's mean over its k highest cells."""
    cells = m.reshape(len(m), -1, m.shape[-1])
    return np.partition(cells, cells.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


# name -> (what it is, function of block5_conv3 maps float32 -> (n, 512)); "avg" is fracfeat's default feature.
REPRESENTATIONS = {
    "avg": ("block5_pool, average pooling (fracfeat's default; the baseline)", lambda m: pool5(m).mean(axis=(1, 2))),
    "max": ("block5_pool, global max pooling", lambda m: pool5(m).max(axis=(1, 2))),
    "gem3": ("block5_pool, GeM p=3", lambda m: gem(pool5(m), 3.0)),
    "gem8": ("block5_pool, GeM p=8", lambda m: gem(pool5(m), 8.0)),
    "top5": ("block5_pool, mean of each channel's top 5 of 49 cells", lambda m: top_k_mean(pool5(m), 5)),
    "c3-top10": ("block5_conv3, mean of each channel's top 10 of 196 cells", lambda m: top_k_mean(m, 10)),
    "in-max": ("block5_pool, instance-normalized, max pooling", lambda m: instance_norm(pool5(m)).max(axis=(1, 2))),
    "in-top5": ("block5_pool, instance-normalized, top-5 mean", lambda m: top_k_mean(instance_norm(pool5(m)), 5)),
    "c3-in-max": ("block5_conv3, instance-normalized, max pooling", lambda m: instance_norm(m).max(axis=(1, 2))),
}


def representations(maps: np.ndarray, index: np.ndarray, names, chunk: int = 256) -> dict[str, np.ndarray]:
    """Each named representation of the rows ``index``, computed in chunks (the maps stay on disk)."""
    out = {n: np.empty((len(index), CHANNELS), np.float32) for n in names}
    for s in range(0, len(index), chunk):
        m = np.asarray(maps[index[s:s + chunk]], dtype=np.float32)
        for n in names:
            out[n][s:s + chunk] = REPRESENTATIONS[n][1](m)
    return out


# ---------------------------------------------------------------- heads and the protocol

def make_head(name: str):
    """Fixed heads (no tuning, so every representation is scored alike): standardize, then the classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    clf = {"logreg": lambda: LogisticRegression(C=0.1, class_weight="balanced", max_iter=3000),
           "svm": lambda: SVC(C=1.0, gamma="scale", class_weight="balanced")}[name]()
    return make_pipeline(StandardScaler(), clf)


class SklearnScorer:
    """fit(train rows) -> scores of other rows, for one representation matrix and one head."""

    def __init__(self, X: np.ndarray, head: str):
        self.X, self.head = X, head

    def __call__(self, train: np.ndarray, score: np.ndarray, y: np.ndarray, parts: np.ndarray) -> np.ndarray:
        model = make_head(self.head).fit(self.X[train], y[train])
        return model.decision_function(self.X[score])


def safe_auc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")


def run_protocol(scorer, cols: dict, folds) -> dict:
    """The fixed protocol for one method: FracAtlas grouped CV, threshold, HBFMID, each region held out."""
    t0 = time.perf_counter()
    y, parts = cols["y"], cols["part"]
    fa, hb = np.flatnonzero(cols["source"] == "fracatlas"), np.flatnonzero(cols["source"] == "hbfmid")
    oof = np.empty(len(fa))
    for tr, te in folds:
        oof[te] = scorer(fa[tr], fa[te], y, parts)
    threshold = choose_threshold(y[fa], oof, "balanced_accuracy")
    s_hb = scorer(fa, hb, y, parts)
    ci = bootstrap_ci(y[hb], s_hb, (s_hb >= threshold).astype(int), cols["group"][hb], n_boot=1000)
    loro = {}
    for part in REGION_ORDER:
        inside = parts[fa] != part
        if inside.all() or not inside.any():
            continue
        loro[part] = safe_auc(y[fa][~inside], scorer(fa[inside], fa[~inside], y, parts))
    return {"fracatlas_cv_roc_auc": safe_auc(y[fa], oof), "threshold": float(threshold),
            "hbfmid": {k: [ci[k]["value"], ci[k]["low"], ci[k]["high"]]
                       for k in ("roc_auc", "sensitivity", "specificity")},
            "loro_roc_auc": loro, "loro_mean": float(np.nanmean(list(loro.values()))) if loro else float("nan"),
            "seconds": time.perf_counter() - t0}


def site_separability(X: np.ndarray, cols: dict) -> float:
    """Grouped 5-fold ROC AUC of a logistic regression telling FracAtlas (0) from HBFMID (1)."""
    d = (cols["source"] == "hbfmid").astype(int)
    oof = np.empty(len(d))
    for tr, te in grouped_folds(d, cols["group"], 5, seed=0):
        oof[te] = make_head("logreg").fit(X[tr], d[tr]).decision_function(X[te])
    return safe_auc(d, oof)


# ---------------------------------------------------------------- the MIL head: a score per cell, pooled

MIL = {"epochs": 10, "batch": 64, "learning_rate": 1e-3, "l2": 1e-4, "dropout": 0.2, "top_k": 5, "attention": 16,
       "cells": "block5_pool (7x7)"}
MIL_POOLINGS = {"mil-max": "max of the cell scores", "mil-top5": "mean of the 5 highest cell scores",
                "mil-attn": "attention-weighted mean of the cell scores (tanh branch of 16 units)"}


def _mil_model(pooling: str, mean: np.ndarray, var: np.ndarray):
    """(n, 49, 512) float16 -> one logit: a linear 1x1-conv score per cell, then ``pooling`` over cells."""
    import keras
    from keras import layers, ops

    inp = keras.Input((MAP_SIDE * MAP_SIDE // 4, CHANNELS), dtype="float16")
    h = layers.Normalization(mean=mean, variance=var)(ops.cast(inp, "float32"))
    h = layers.Dropout(MIL["dropout"])(h)
    cell = ops.squeeze(layers.Dense(1, kernel_regularizer=keras.regularizers.L2(MIL["l2"]))(h), -1)
    if pooling == "mil-max":
        out = ops.max(cell, axis=1)
    elif pooling == "mil-top5":
        out = ops.mean(ops.top_k(cell, MIL["top_k"])[0], axis=1)
    else:
        a = layers.Dense(1)(layers.Dense(MIL["attention"], activation="tanh")(h))
        out = ops.sum(ops.softmax(ops.squeeze(a, -1), axis=1) * cell, axis=1)
    model = keras.Model(inp, ops.expand_dims(out, -1))
    model.compile(keras.optimizers.Adam(MIL["learning_rate"]), keras.losses.BinaryCrossentropy(from_logits=True))
    return model


class MilScorer:
    """Trains the MIL head on the block5_pool cells of the training rows (class-balanced weights)."""

    def __init__(self, cells: np.ndarray, pooling: str):
        self.cells, self.pooling = cells, pooling

    def _channel_stats(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        total, total_sq, n = np.zeros(CHANNELS), np.zeros(CHANNELS), 0
        for s in range(0, len(rows), 256):
            c = self.cells[rows[s:s + 256]].astype(np.float64).reshape(-1, CHANNELS)
            total, total_sq, n = total + c.sum(0), total_sq + (c * c).sum(0), n + len(c)
        mean = total / n
        return mean, np.maximum(total_sq / n - mean ** 2, 1e-6)

    def __call__(self, train: np.ndarray, score: np.ndarray, y: np.ndarray, parts: np.ndarray) -> np.ndarray:
        import keras

        keras.utils.set_random_seed(0)
        keras.config.set_dtype_policy("float32")
        model = _mil_model(self.pooling, *self._channel_stats(train))
        yt = y[train]
        weight = np.where(yt == 1, 0.5 / yt.mean(), 0.5 / (1 - yt.mean()))
        model.fit(self.cells[train], yt.astype(np.float32), sample_weight=weight, epochs=MIL["epochs"],
                  batch_size=MIL["batch"], shuffle=True, verbose=0)
        return model.predict(self.cells[score], batch_size=256, verbose=0)[:, 0]


# ---------------------------------------------------------------- the run, the table, the rule

HEADS = ("logreg", "svm")


def verdict(results: dict) -> dict:
    """The pre-declared rule: beat the baseline (avg, same head; for MIL heads, the better avg head) on HBFMID
    ROC AUC and on the mean LORO ROC AUC, losing no more than 0.01 of FracAtlas CV."""
    out = {}
    for name, r in results.items():
        if name.startswith("avg/"):
            continue
        heads = [name.split("/")[1]] if "/" in name else list(HEADS)
        bases = [results[f"avg/{h}"] for h in heads if f"avg/{h}" in results]
        if not bases:
            continue
        wins = all(r["hbfmid"]["roc_auc"][0] > b["hbfmid"]["roc_auc"][0] and r["loro_mean"] > b["loro_mean"]
                   and r["fracatlas_cv_roc_auc"] >= b["fracatlas_cv_roc_auc"] - 0.01 for b in bases)
        out[name] = "wins" if wins else "does not win"
    return out


def table(results: dict) -> str:
    """The markdown table of every method."""
    def ci(v):
        return f"{v[0]:.2f} [{v[1]:.2f}-{v[2]:.2f}]"
    lines = ["| method | FracAtlas CV | HBFMID ROC AUC | HBFMID sens. | HBFMID spec. | LORO shoulder / hip / leg / hand"
             " | LORO mean | site sep. | s |", "|" + "---|" * 9]
    for name, r in results.items():
        loro = " / ".join(f"{r['loro_roc_auc'].get(p, float('nan')):.2f}" for p in REGION_ORDER)
        sep = r.get("site_separability")
        lines.append(f"| {name} | {r['fracatlas_cv_roc_auc']:.3f} | {ci(r['hbfmid']['roc_auc'])} | "
                     f"{ci(r['hbfmid']['sensitivity'])} | {ci(r['hbfmid']['specificity'])} | {loro} | "
                     f"{r['loro_mean']:.3f} | {'-' if sep is None else f'{sep:.3f}'} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def save_partial(args, results: dict) -> None:
    """The results so far next to ``--out`` (a long run interrupted keeps what it measured)."""
    if args.out:
        args.out.with_suffix(".partial.json").write_text(json.dumps(results, indent=1, default=float) + "\n")


def measure(args) -> dict:
    """Every representation x head, then the MIL heads, under the one protocol; returns the results JSON."""
    maps, cols = load_maps(args.maps)
    fa = np.flatnonzero(cols["source"] == "fracatlas")
    folds = grouped_folds(cols["y"][fa], cols["group"][fa], 5, seed=0)
    reps = [r for r in args.representations.split(",") if r]
    t0 = time.perf_counter()
    X = representations(maps, cols["index"], reps)
    print(f"{len(reps)} representations of {len(cols['y'])} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {}
    for rep in reps:
        sep = site_separability(X[rep], cols)
        for head in HEADS:
            results[f"{rep}/{head}"] = {**run_protocol(SklearnScorer(X[rep], head), cols, folds),
                                        "representation": REPRESENTATIONS[rep][0], "site_separability": sep}
            print(table({f"{rep}/{head}": results[f"{rep}/{head}"]}).splitlines()[-1], flush=True)
            save_partial(args, results)
    mil = [m for m in args.mil.split(",") if m]
    if mil:
        idx = cols["index"]
        cells = np.concatenate([pool5(np.asarray(maps[idx[s:s + 256]])) for s in range(0, len(idx), 256)])
        cells = cells.reshape(len(idx), -1, CHANNELS)
        for pooling in mil:
            results[pooling] = {**run_protocol(MilScorer(cells, pooling), cols, folds),
                                "representation": f"block5_pool cells, {MIL_POOLINGS[pooling]}", "mil": MIL}
            print(table({pooling: results[pooling]}).splitlines()[-1], flush=True)
            save_partial(args, results)
    return {"results": results, "verdict": verdict(results), "n_rows": {
        s: int((cols["source"] == s).sum()) for s in SOURCES}, "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--maps", type=Path, default=Path("/work/research/s27_maps"),
                    help="the cached maps folder (maps.npy, rows.csv), written by --compute-maps")
    ap.add_argument("--compute-maps", action="store_true", help="compute the maps into --maps, then stop")
    ap.add_argument("--limit", type=int, default=0, help="with --compute-maps: only this many rows per source")
    ap.add_argument("--representations", default=",".join(REPRESENTATIONS))
    ap.add_argument("--mil", default=",".join(MIL_POOLINGS), help="MIL poolings to train ('' for none)")
    ap.add_argument("--out", type=Path, help="results JSON (e.g. benchmarks/results/local_evidence.json)")
    ap.add_argument("--table", nargs="+", type=Path, help="print the table and the rule from result files")
    args = ap.parse_args(argv)
    if args.table:
        merged = {k: v for f in args.table for k, v in json.loads(f.read_text())["results"].items()}
        print(table(merged))
        for name, v in verdict(merged).items():
            print(f"{name}: {v}")
        return
    if args.compute_maps:
        compute_maps(args.maps, args.limit)
        return
    report = measure(args)
    report.update(machine=describe_machine(), maps=str(args.maps), trained_on="FracAtlas (use=1 rows)",
                  scored_on="HBFMID (all rows); FracAtlas regions held out; FracAtlas grouped 5-fold CV",
                  command=" ".join(sys.argv))
    print(table(report["results"]))
    for name, v in report["verdict"].items():
        print(f"{name}: {v}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
        args.out.with_suffix(".partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
