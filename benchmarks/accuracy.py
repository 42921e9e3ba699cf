"""Accuracy on real radiographs: grouped 5-fold out-of-fold scores with bootstrap CIs, per method.

Rows: FracAtlas manifest rows with use=1. Folds: StratifiedGroupKFold over the manifest's group
column (near-duplicate radiographs never straddle a fold), fixed seed, the same folds for every
method. Tuned methods run fracfeat.fit inside each outer training fold only (nested: its Optuna
study and its decision threshold see the training rows, never the test fold). Intervals: 95%
percentile bootstrap resampling *groups* (cluster bootstrap) of the out-of-fold predictions.

Features come from the store (``--store``); a method whose features are missing there is
extracted first (``--skip-missing`` skips it instead). Extraction time is read from the provenance
of the store version that computed the rows.

Augmentation: ``METHOD+aug`` trains every fold (inner tuning folds included) on the training rows
plus their augmented views (``--views``, each its own store entry, sharing the original's group);
test folds are scored on the original images. ``--tta`` adds a ``+tta`` row per method from the same
fold models: P(fractured) averaged over each test image and its views, decided at the model's own
threshold. ``cat224+448`` joins the 224 px and 448 px average-pooled store entries side by side
(``fracfeat.join_features``, as ``extract(join=...)`` makes them; ``ms224+448`` is the one-pass
``scales=`` extractor); ``cat-ml34+448`` puts the multi-layer 224 px entry beside the 448 px one: the
``fracatlas-vgg16-ml34-448-svm`` preset.

    python benchmarks/accuracy.py --store /work/stores/fracatlas-vgg16 \
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5 --methods logreg-avg,svm-avg --trials 20

``--cv region`` (or ``source``) replaces the grouped outer folds by leave-one-value-out: each outer fold
holds out one whole body region (the manifest's ``region`` column folded as the issue-15 research did: of
the regions a row names, the first in the order shoulder > hip > leg > hand) or source (a ``source`` /
``site`` / ``hospital`` / ``institution`` column), tuning runs on the other values only, and a table per
held-out value follows each method's row.
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

from fracfeat import FeatureStore, extract, fit, join_features  # noqa: E402
from fracfeat._config import resolve_extractor  # noqa: E402
from fracfeat._extract import hash_files  # noqa: E402
from fracfeat._hardware import describe_machine  # noqa: E402
from fracfeat._validation import (bootstrap_ci, grouped_folds, leave_one_value_out, out_of_fold,  # noqa: E402
                                  per_value_lines, per_value_metrics)

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
    "tiles2": dict(pooling="avg", tiles=2),
    "tiles3": dict(pooling="avg", tiles=3),
    "ms224+448": dict(pooling="avg", scales=(224, 448)),
    "ml4": dict(pooling="avg", layers=("block4_pool",)),
    "ml34": dict(pooling="avg", layers=("block3_pool", "block4_pool")),
}
# Store entries joined side by side (fracfeat.join_features: rows matched by image id), as extract(join=) makes them.
JOINED = {"cat224+448": ("avg", "avg448"), "cat-ml34+448": ("ml34", "avg448")}
METHODS = {"baseline": ("flat", "seed-lr")}
for _ex in ("avg", "max", "avg448", "tiles2", "tiles3", "ms224+448", "ml4", "ml34", *JOINED):
    for _clf in ("logreg", "svm", "xgboost", "mlp", "auto"):  # mlp: the frozen base + dense head recipe
        METHODS[f"{_clf}-{_ex}"] = (_ex, _clf)
        METHODS[f"{_clf}-{_ex}+aug"] = (_ex, _clf)
DEFAULT_METHODS = "baseline,logreg-avg,svm-avg,xgboost-avg,auto-avg,logreg-max,svm-max,xgboost-max,auto-max"


REGION_ORDER = ("shoulder", "hip", "leg", "hand")
SOURCE_COLUMNS = ("source", "site", "hospital", "institution")


def folded_region(named: str) -> str:
    """``hand+shoulder`` -> ``shoulder``: of the regions named, the first in REGION_ORDER ("" for none)."""
    parts = set(named.split("+"))
    return next((r for r in REGION_ORDER if r in parts), "")


def manifest_rows(data: Path):
    with open(data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["use"] == "1"]
    return [str(data / r["path"]) for r in rows], [r["label"] for r in rows], [r["group"] for r in rows]


def manifest_values(data: Path, what: str) -> list[str]:
    """Each use=1 row's folded region, or its source column, in manifest_rows' order."""
    with open(data / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["use"] == "1"]
    if what == "region":
        return [folded_region(r.get("region", "")) for r in rows]
    column = next((c for c in SOURCE_COLUMNS if rows and c in rows[0]), None)
    return [r[column] if column else "" for r in rows]


def outer_folds(args, y, groups, values):
    """The outer folds: grouped K folds, or (``values`` given) one held-out region or source each."""
    if values is not None:
        return leave_one_value_out(values, y, groups, what=args.cv)
    return grouped_folds(y, groups, int(args.cv or args.folds), args.seed)


def extractor_kwargs(name: str, args, view: str | None = None) -> dict:
    return dict(backbone="vgg16", weights=args.weights, **EXTRACTORS[name], **({"view": view} if view else {}))


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


def tuned(classifier: str, args, augment=()):
    def fit_fold(train):
        # augment: whole view sets; fit takes only the views of the training rows (matched by image id).
        res = fit(train, classifier=classifier, n_trials=args.trials, cv=args.inner_cv, seed=args.seed,
                  threshold="balanced_accuracy", n_threads=args.threads, augment=augment)
        # The fold model takes feature arrays: the Pipeline without its image-reading step (DeepFeatures, or
        # JoinedFeatures for joined store entries).
        model = res.pipeline[1:] if res.pipeline.steps[0][0] == "features" else res.pipeline
        return model, {"classifier": res.classifier, "inner_cv_auc": res.cv_score, "steps": list(model.named_steps),
                                  "threshold": res.threshold, "trials": res.trials, "best_params": res.best_params,
                                  "n_train": res.n_train, "augment": list(res.augment)}
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
    ap.add_argument("--cv", default=None, metavar="K|region|source",
                    help="outer folds: K grouped folds (default: --folds), or region / source: leave one out, with a "
                         "table per held-out value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="XGBoost threads")
    ap.add_argument("--limit", type=int, default=None, help="N use=1 rows spread over the manifest (quick checks)")
    ap.add_argument("--skip-missing", action="store_true", help="skip methods whose features are not in the store")
    ap.add_argument("--views", default="hflip,crop0.8",
                    help="augmented views for +aug methods and --tta (default: hflip,crop0.8)")
    ap.add_argument("--tta", action="store_true",
                    help="also score each method with test-time augmentation (P averaged over the --views)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy.json")
    args = ap.parse_args(argv)
    if args.table:
        for path in args.table:
            report = json.loads(path.read_text())
            print(f"<!-- {path.name}: {report['command']} (wall {report['wall_seconds']:.0f}s) -->")
        rows = {}  # a method measured in several files is shown once: its first file's row
        for path in args.table:
            for r in json.loads(path.read_text())["results"]:
                rows.setdefault(r["method"], r)
        print(markdown(list(rows.values())))
        return 0
    if args.store is None:
        ap.error("--store is required (or --table to print earlier results)")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    paths, labels, groups = manifest_rows(args.data)
    by_value = args.cv in ("region", "source")
    values = manifest_values(args.data, args.cv) if by_value else paths
    if args.limit:
        step = max(1, len(paths) // args.limit)  # spread over the manifest, which lists one class first
        paths, labels, groups, values = (v[::step][:args.limit] for v in (paths, labels, groups, values))
    store = FeatureStore(args.store)
    ids = [h for h, _ in hash_files(paths)]
    y = np.array([1 if lab == "fractured" else 0 for lab in labels])
    held_values = np.array(values, dtype=object) if by_value else None
    folds = outer_folds(args, y, groups, held_values)  # one set of folds, shared by every method
    t_all = time.perf_counter()

    views = [v.strip() for v in args.views.split(",") if v.strip()]
    feature_sets, results = {}, []

    def features(ex: str, view: str | None = None):
        """The rows of extractor ``ex`` (optionally an augmented view), extracted first if missing; None
        when missing and --skip-missing."""
        if (ex, view) in feature_sets:
            return feature_sets[ex, view]
        if ex in JOINED:
            parts = [features(part, view) for part in JOINED[ex]]
            fs = None if any(p is None for p in parts) else join_features(*parts)
        else:
            kwargs = extractor_kwargs(ex, args, view)
            if args.skip_missing and cached_fraction(store, kwargs, ids) < 1.0:
                return None
            fs = extract(paths, labels=labels, groups=groups, store=store, progress=True,
                         description="benchmarks/accuracy.py: FracAtlas use=1", **kwargs)
            if len(fs) != len(paths):
                raise SystemExit(f"{len(paths) - len(fs)} images failed to extract; the folds need every row")
        feature_sets[ex, view] = fs
        return fs

    for method in methods:
        ex, clf = METHODS[method]
        aug = method.endswith("+aug")
        fs = features(ex)
        view_sets = [features(ex, v) for v in views] if (aug or args.tta) else []
        if fs is None or any(v is None for v in view_sets):
            print(f"# {method}: features {ex} (or its views) not (all) in {store.root}; skipped (--skip-missing)",
                  flush=True)
            continue
        fit_fold = seed_baseline if clf == "seed-lr" else tuned(clf, args, augment=view_sets if aug else ())
        fit_fold = with_progress(method, fit_fold, args.folds)
        print(f"# {method}: {len(fs)} images x {fs.n_features} features"
              f"{' + views ' + ','.join(views) if aug else ''} ...", flush=True)
        oof = out_of_fold(fs, fit_fold, folds, tta_views=[v.X for v in view_sets] if args.tta else ())
        made = fs.provenance.get("parts") or [fs.provenance]  # one store version, or the joined ones

        def cost(with_views: bool) -> dict:
            """Extraction of the rows, plus of their views where the row needs them (+aug, +tta)."""
            view_parts = [p for v in view_sets for p in v.provenance.get("parts") or [v.provenance]]
            costs = [extraction_cost(store, p["fingerprint"]) for p in made + (view_parts if with_views else [])]
            seconds, images = sum(c["extract_seconds"] for c in costs), sum(c["extract_images"] for c in costs)
            return {"extract_seconds": round(seconds, 1), "extract_images": images,
                    "images_per_second": round(images / seconds, 2) if seconds else None}

        settings = [{k: v for k, v in p.items() if k in ("image_size", "pooling", "runtime", "precision", "tiles",
                                                          "scales", "layers", "version")} for p in made]
        common = {
            "features": ex, "classifier": clf, "n_features": fs.n_features,
            "store_version": fs.version_label, "fingerprint": fs.fingerprint,
            **(settings[0] if len(settings) == 1 else {"parts": settings}),
            "tuning_seconds": round(sum(oof.fit_seconds), 1), "fold_seconds": [round(s, 1) for s in oof.fit_seconds],
            "folds": oof.details,
        }
        scored = [(method, oof.score, oof.pred, {"augment": views if aug else [], **cost(aug)})]
        if args.tta:
            scored.append((method + "+tta", oof.score_tta, oof.pred_tta,
                           {"augment": views if aug else [], "tta_views": views, **cost(True)}))
        for name, score, pred, extra in scored:
            ci = bootstrap_ci(oof.y, score, pred, oof.groups, n_boot=args.n_boot, seed=args.seed)
            row = {"method": name, **common, **extra, "metrics": ci}
            if held_values is not None:
                row["by_value"] = per_value_metrics(oof.y, score, pred, held_values, oof.groups, n_boot=args.n_boot,
                                                    seed=args.seed)
            results.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
            if held_values is not None:
                print("\n".join(per_value_lines(row["by_value"], args.cv)), flush=True)

    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]),
        "rows": len(paths), "positives": int(y.sum()), "groups": len(set(groups)), "folds": len(folds),
        "outer_cv": args.cv or args.folds,
        "seed": args.seed, "trials_per_fold": args.trials, "inner_cv": args.inner_cv, "views": views,
        "bootstrap": {"n_boot": args.n_boot, "resampled": "groups", "level": 0.95},
        "threshold": "tuned methods: maximize balanced accuracy on inner out-of-fold predictions; seed-lr: 0.5",
        "wall_seconds": round(time.perf_counter() - t_all, 1),
        "load_average": os.getloadavg(),
        "machine": describe_machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(markdown(results))
    m = report["machine"]
    held = f"held-out {args.cv}s" if by_value else "grouped folds"
    print(f"\n{len(paths)} images, {report['groups']} groups, {len(folds)} {held}; "
          f"wall {report['wall_seconds']:.0f}s; on {m['cpu']} ({m['cpu_count']} cores; {' '.join(m['cpu_flags'])}); "
          f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
