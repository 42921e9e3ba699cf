"""Accuracy on real radiographs: grouped 5-fold out-of-fold scores with bootstrap CIs, per method.

Rows: FracAtlas manifest rows with use=1. Folds: StratifiedGroupKFold over the manifest's group
column (near-duplicate radiographs never straddle a fold), fixed seed, the same folds for every
method. Tuned methods run fracfeat.fit inside each outer training fold only (nested: its Optuna
study and its decision threshold see the training rows, never the test fold). Intervals: 95%
percentile bootstrap resampling *groups* (cluster bootstrap) of the out-of-fold predictions.

Features come from the store (``--store``); a method whose features are missing there is
extracted first (``--skip-missing`` skips it instead). Extraction time is read from the provenance
of the store version that computed the rows.

    python benchmarks/accuracy.py --store /work/stores/fracatlas-vgg16 \
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5 --methods logreg-avg,svm-avg --trials 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fracfeat import FeatureStore, extract, fit  # noqa: E402
from fracfeat._engine import resolve_extractor  # noqa: E402
from fracfeat._extract import hash_files  # noqa: E402
from fracfeat._validation import bootstrap_ci, grouped_folds, out_of_fold  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fracatlas"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights" / "vgg16_imagenet_notop.weights.h5"

# name -> (extractor settings beyond the backbone's, classifier). "seed-lr" is the seed recipe:
# default LogisticRegression on the flattened last convolution map, threshold 0.5.
EXTRACTORS = {
    "avg": dict(pooling="avg"),
    "max": dict(pooling="max"),
    "flat": dict(pooling="none"),
    "avg448": dict(pooling="avg", image_size=448),
    "tiles3": dict(pooling="avg", tiles=3),
    "ms224+448": dict(pooling="avg", scales=(224, 448)),
    "ml4": dict(pooling="avg", layers=("block4_pool",)),
    "ml34": dict(pooling="avg", layers=("block3_pool", "block4_pool")),
}
METHODS = {"baseline": ("flat", "seed-lr")}
for _ex in ("avg", "max", "avg448", "tiles3", "ms224+448", "ml4", "ml34"):
    for _clf in ("logreg", "svm", "xgboost", "auto"):
        METHODS[f"{_clf}-{_ex}"] = (_ex, _clf)
DEFAULT_METHODS = "baseline,logreg-avg,svm-avg,xgboost-avg,auto-avg,logreg-max,svm-max,xgboost-max,auto-max"


def manifest_rows(data: Path):
    with open(data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["use"] == "1"]
    return [str(data / r["path"]) for r in rows], [r["label"] for r in rows], [r["group"] for r in rows]


def extractor_kwargs(name: str, args) -> dict:
    return dict(backbone="vgg16", weights=args.weights, **EXTRACTORS[name])


def cached_fraction(store: FeatureStore, kwargs: dict, ids) -> float:
    """Share of the rows already in the store under these settings (nothing is computed)."""
    settings = {k: v for k, v in kwargs.items() if k != "backbone" and k != "weights"}
    config, _ = resolve_extractor(kwargs["backbone"], kwargs["weights"], **settings)
    if not store.exists():
        return 0.0
    index = store.cache_index(config.fingerprint)
    return float(np.mean([i in index for i in ids]))


def extraction_cost(store: FeatureStore, fingerprint: str) -> dict:
    """Seconds and images of the store versions (this fingerprint) that computed rows, from provenance."""
    seconds, images = 0.0, 0
    for info in store.versions():
        prov = store.provenance(info.version)
        if prov.get("fingerprint") == fingerprint and prov.get("n_computed", 0):
            seconds += float(prov.get("compute_seconds", 0.0))
            images += int(prov["n_computed"])
    return {"extract_seconds": round(seconds, 1), "extract_images": images,
            "images_per_second": round(images / seconds, 2) if seconds else None}


def seed_baseline(train):
    from sklearn.linear_model import LogisticRegression

    # The recipe users start from: sklearn's defaults, except enough iterations to converge on 25,088 features.
    return LogisticRegression(max_iter=1000).fit(train.X, train.y), {"params": "LogisticRegression(max_iter=1000)"}


def tuned(classifier: str, args):
    def fit_fold(train):
        res = fit(train, classifier=classifier, n_trials=args.trials, cv=args.inner_cv, seed=args.seed,
                  threshold="balanced_accuracy", n_threads=args.threads)
        return res.pipeline[1:], {"classifier": res.classifier, "inner_cv_auc": res.cv_score,
                                  "threshold": res.threshold, "trials": res.trials, "best_params": res.best_params}
    return fit_fold


def with_progress(method: str, fit_fold, n_folds: int):
    done = []

    def fit_and_say(train):
        t = time.perf_counter()
        out = fit_fold(train)
        done.append(1)
        print(f"#   {method}: fold {len(done)}/{n_folds} trained in {time.perf_counter() - t:.0f}s", flush=True)
        return out
    return fit_and_say


def fmt(m: dict) -> str:
    return f"{m['value']:.3f} ({m['low']:.3f}-{m['high']:.3f})"


def markdown(results: list[dict]) -> str:
    head = ("| method | features | ROC AUC | balanced acc. | sensitivity | specificity | F1 | sens. @ spec>=0.85 "
            "| extraction s (img/s) | tuning s |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        m = r["metrics"]
        ext = f"{r['extract_seconds']:.0f} ({r['images_per_second']})" if r["extract_seconds"] else "n/a"
        lines.append(f"| {r['method']} | {r['features']} ({r['n_features']}) | {fmt(m['roc_auc'])} "
                     f"| {fmt(m['balanced_accuracy'])} | {fmt(m['sensitivity'])} | {fmt(m['specificity'])} "
                     f"| {fmt(m['f1'])} | {fmt(m['sensitivity_at_specificity'])} | {ext} | {r['tuning_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--store", type=Path)
    ap.add_argument("--table", type=Path, nargs="+", metavar="JSON",
                    help="only print one Markdown table from result files of earlier runs (e.g. run side by side)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(METHODS)}")
    ap.add_argument("--trials", type=int, default=30, help="Optuna trials per outer fold")
    ap.add_argument("--inner-cv", type=int, default=5, help="grouped folds of the nested tuning")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="XGBoost threads")
    ap.add_argument("--limit", type=int, default=None, help="N use=1 rows spread over the manifest (quick checks)")
    ap.add_argument("--skip-missing", action="store_true", help="skip methods whose features are not in the store")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy.json")
    args = ap.parse_args(argv)
    if args.table:
        for path in args.table:
            report = json.loads(path.read_text())
            print(f"<!-- {path.name}: {report['command']} (wall {report['wall_seconds']:.0f}s) -->")
        print(markdown([r for path in args.table for r in json.loads(path.read_text())["results"]]))
        return 0
    if args.store is None:
        ap.error("--store is required (or --table to print earlier results)")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    paths, labels, groups = manifest_rows(args.data)
    if args.limit:
        step = max(1, len(paths) // args.limit)  # spread over the manifest, which lists one class first
        paths, labels, groups = paths[::step][:args.limit], labels[::step][:args.limit], groups[::step][:args.limit]
    store = FeatureStore(args.store)
    ids = [h for h, _ in hash_files(paths)]
    y = np.array([1 if lab == "fractured" else 0 for lab in labels])
    folds = grouped_folds(y, groups, args.folds, args.seed)  # one set of folds, shared by every method
    t_all = time.perf_counter()

    feature_sets, results = {}, []
    for method in methods:
        ex, clf = METHODS[method]
        if ex not in feature_sets:
            kwargs = extractor_kwargs(ex, args)
            if args.skip_missing and cached_fraction(store, kwargs, ids) < 1.0:
                print(f"# {method}: features {ex} not (all) in {store.root}; skipped (--skip-missing)", flush=True)
                continue
            fs = extract(paths, labels=labels, groups=groups, store=store, progress=True,
                         description="benchmarks/accuracy.py: FracAtlas use=1", **kwargs)
            if len(fs) != len(paths):
                raise SystemExit(f"{len(paths) - len(fs)} images failed to extract; the folds need every row")
            feature_sets[ex] = fs
        fs = feature_sets[ex]
        fit_fold = seed_baseline if clf == "seed-lr" else tuned(clf, args)
        fit_fold = with_progress(method, fit_fold, args.folds)
        print(f"# {method}: {len(fs)} images x {fs.n_features} features ...", flush=True)
        oof = out_of_fold(fs, fit_fold, folds)
        ci = bootstrap_ci(oof.y, oof.score, oof.pred, oof.groups, n_boot=args.n_boot, seed=args.seed)
        row = {
            "method": method, "features": ex, "classifier": clf, "n_features": fs.n_features,
            "store_version": fs.version, "fingerprint": fs.fingerprint,
            **{k: v for k, v in fs.provenance.items() if k in ("image_size", "pooling", "runtime", "precision",
                                                                "tiles", "scales", "layers")},
            **extraction_cost(store, fs.fingerprint),
            "tuning_seconds": round(sum(oof.fit_seconds), 1), "fold_seconds": [round(s, 1) for s in oof.fit_seconds],
            "metrics": ci, "folds": oof.details,
        }
        results.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)

    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
        "rows": len(paths), "positives": int(y.sum()), "groups": len(set(groups)), "folds": args.folds,
        "seed": args.seed, "trials_per_fold": args.trials, "inner_cv": args.inner_cv,
        "bootstrap": {"n_boot": args.n_boot, "resampled": "groups", "level": 0.95},
        "threshold": "tuned methods: maximize balanced accuracy on inner out-of-fold predictions; seed-lr: 0.5",
        "wall_seconds": round(time.perf_counter() - t_all, 1),
        "load_average": os.getloadavg(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(markdown(results))
    print(f"\n{len(paths)} images, {report['groups']} groups, {args.folds} grouped folds; "
          f"wall {report['wall_seconds']:.0f}s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
