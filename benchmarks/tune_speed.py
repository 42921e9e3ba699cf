"""Tuning speed: Optuna trials per minute with and without pruning, per classifier, on FracAtlas VGG16 features.

For each classifier, the same study (same seed, folds and trial budget) runs with the per-fold median
pruner and without it, alternating in one run so machine load hits both alike; medians over repeats,
and the ratio pruned / unpruned. The best cross-validated score of each is reported too, to show what
pruning costs in quality (it should cost little).

    python benchmarks/tune_speed.py                                  # full clean FracAtlas, 224 px
    python benchmarks/tune_speed.py --limit 1000 --n-trials 30 --repeats 2

The VGG16 store is extracted first when it does not hold these images yet (real ImageNet weights from
../shared/weights; on a 2-core CPU the full set at 224 px takes a while: --limit and --image-size make
it smaller, and the output says what ran). Writes benchmarks/results/tune_speed.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from fracatlas import FRACATLAS, VGG16_WEIGHTS, write_manifest  # noqa: E402

from fracfeat import extract, fit  # noqa: E402


def study_minutes(study) -> float:
    """Wall time of the study's trials: first start to last end."""
    trials = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return (end - start).total_seconds() / 60


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(FRACATLAS))
    p.add_argument("--weights", default=str(VGG16_WEIGHTS))
    p.add_argument("--store", default="fracatlas-vgg16-store", help="extracted here if missing (reused after)")
    p.add_argument("--limit", type=int, default=None, help="images (whole groups, class ratio kept); default all")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classifiers", default="logreg,svm,xgboost")
    p.add_argument("--n-trials", type=int, default=50)
    p.add_argument("--cv", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="threads per XGBoost fit (1: on a shared 2-core machine more threads ran slower)")
    p.add_argument("--out", default=str(HERE / "results" / "tune_speed.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fracfeat").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "fracatlas.csv"
        counts = write_manifest(manifest, args.data, limit=args.limit)
        t = time.perf_counter()
        fs = extract(str(manifest), backbone="vgg16", weights=args.weights, image_size=args.image_size,
                     store=args.store, progress=sys.stderr.isatty())
        extract_s = time.perf_counter() - t
    prov = fs.provenance
    print(f"features: {fs!r}\n  store {args.store} v{fs.version}, {prov['runtime']} {prov['precision']}, "
          f"{prov['n_computed']} computed + {prov['n_reused']} reused in {extract_s:.0f}s")
    print(f"tuning: {args.n_trials} trials x {args.cv} grouped folds, repeats={args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")

    rows = []
    for classifier in args.classifiers.split(","):
        runs = {"pruned": [], "unpruned": []}
        fit(fs, classifier=classifier, n_trials=1, cv=args.cv, n_threads=args.threads)  # warm-up, untimed
        for r in range(args.repeats):
            # Alternate which mode goes first, so drifting machine load favours neither.
            for mode in (("pruned", "unpruned") if r % 2 == 0 else ("unpruned", "pruned")):
                result = fit(fs, classifier=classifier, n_trials=args.n_trials, cv=args.cv, seed=r,
                             pruner=mode == "pruned", n_threads=args.threads)
                minutes = study_minutes(result.study)
                # Folds actually fitted: the work pruning saves, independent of machine load.
                fold_fits = sum(len(t.intermediate_values) for t in result.study.trials)
                runs[mode].append({"trials_per_minute": args.n_trials / minutes, "minutes": minutes,
                                   "pruned": result.trials["pruned"], "fold_fits": fold_fits,
                                   "best_cv_roc_auc": result.cv_score})
                print(f"  {classifier:8s} {mode:9s} repeat {r}: {args.n_trials / minutes:7.1f} trials/min "
                      f"({minutes:.2f} min, {result.trials['pruned']} pruned, {fold_fits} fold fits, best cv ROC AUC {result.cv_score:.4f})",
                      flush=True)
        med = {m: {k: statistics.median(run[k] for run in v) for k in v[0]} for m, v in runs.items()}
        ratio = med["pruned"]["trials_per_minute"] / med["unpruned"]["trials_per_minute"]
        rows.append({"classifier": classifier, "median": med, "speedup_pruned_over_unpruned": ratio, "runs": runs})

    print(f"\n{'classifier':10s} {'pruned t/min':>13s} {'unpruned t/min':>15s} {'speed-up':>9s} "
          f"{'pruned trials':>14s} {'best AUC pruned':>16s} {'unpruned':>9s}")
    for row in rows:
        pm, um = row["median"]["pruned"], row["median"]["unpruned"]
        print(f"{row['classifier']:10s} {pm['trials_per_minute']:13.1f} {um['trials_per_minute']:15.1f} "
              f"{row['speedup_pruned_over_unpruned']:8.2f}x {pm['pruned']:>8.0f}/{args.n_trials:<5d} "
              f"{pm['best_cv_roc_auc']:16.4f} {um['best_cv_roc_auc']:9.4f}")

    report = {
        "benchmark": "tune_speed", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "data": {"images": len(fs), "fractured": int((fs.y == 1).sum()), "limit": args.limit, **counts},
        "extractor": {k: prov[k] for k in ("backbone", "image_size", "pooling", "precision", "runtime", "weights")},
        "n_trials": args.n_trials, "cv": args.cv, "repeats": args.repeats, "xgboost_threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_end": os.getloadavg()},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
