"""Does weighting each body region's classes equally remove FracAtlas' region confound? (issue 15, item 2)

FracAtlas body regions differ in fracture rate (hand about 30%, leg about 10%), and a model can score
well by learning which region an image shows. This script tunes fracfeat.fit with leave-one-region-out
CV (``cv="region"``: each fold holds out one whole region; tuning and the decision threshold only see
the other regions' out-of-fold rows), with ``balance=None`` and ``balance="region"``, for the SVM and
logistic regression, and reports each held-out region's ROC AUC, sensitivity and specificity at the kept
threshold, with 95% group-bootstrap intervals. The kept model of each fit (trained on all of FracAtlas,
with that balance) is then scored on HBFMID, a web-collected source it never saw.

Rows: FracAtlas manifest rows with use=1 (4,059) of the store version (VGG16 224 px avg); region folded as
the issue-15 research did: of the regions a row names, the first in the order shoulder > hip > leg > hand.
HBFMID: its rows in the same store (same extractor fingerprint), groups from its manifest.

    nice -n 15 python benchmarks/multisource_measure.py --store /work/stores/fracatlas --fa-version 1 \
        --hbfmid-version 5 --trials 15 --out benchmarks/results/multisource_region.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import REGION_ORDER, folded_region  # noqa: E402  (benchmarks/accuracy.py: one folding)
from fracfeat import FeatureStore, fit  # noqa: E402
from fracfeat._validation import bootstrap_ci  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FRACATLAS = REPO.parent / "shared" / "data" / "fracatlas"


def fracatlas_rows(store: FeatureStore, version: int, manifest: Path):
    """The version's use=1 rows, each with its folded region from the manifest (matched by path)."""
    with open(manifest, newline="") as f:
        rows = {str((manifest.parent / r["path"]).resolve()): r for r in csv.DictReader(f)}
    fs = store.open(version)
    meta = [rows.get(str(Path(p).resolve())) for p in fs.paths]
    keep = np.array([m is not None and m["use"] == "1" for m in meta])
    regions = np.array([folded_region(m["region"]) if m else "" for m in meta], dtype=object)
    fs = replace(fs, regions=regions).subset(keep)
    return fs


def scored_on(pipeline, fs) -> dict:
    """ROC AUC, sensitivity and specificity (kept threshold) of ``pipeline[1:]`` on ``fs``, group-bootstrap CIs."""
    head = pipeline[1:]
    X = np.asarray(fs.X, dtype=np.float32)
    score, pred = head.predict_proba(X)[:, 1], head.predict(X)
    ci = bootstrap_ci(fs.y, score, pred, fs.groups if fs.has_groups else None, n_boot=1000, seed=0)
    return {k: ci[k] for k in ("roc_auc", "sensitivity", "specificity")} | {"n": len(fs),
                                                                          "n_fractured": int(fs.y.sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="/work/stores/fracatlas")
    ap.add_argument("--fa-version", type=int, default=1)
    ap.add_argument("--hbfmid-version", type=int, default=5)
    ap.add_argument("--manifest", default=str(FRACATLAS / "manifest.csv"))
    ap.add_argument("--classifiers", default="svm,logreg")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multisource_region.json"))
    args = ap.parse_args(argv)
    store = FeatureStore(args.store)
    fa = fracatlas_rows(store, args.fa_version, Path(args.manifest))
    hb = store.open(args.hbfmid_version)
    print(f"FracAtlas v{args.fa_version}: {len(fa)} rows; regions "
          + ", ".join(f"{r} {int((fa.regions == r).sum())} ({fa.y[fa.regions == r].mean():.0%} fractured)"
                      for r in REGION_ORDER) + f"; HBFMID v{args.hbfmid_version}: {len(hb)} rows", flush=True)
    results = []
    for classifier in args.classifiers.split(","):
        for balance in (None, "region"):
            t = time.perf_counter()
            r = fit(fa, classifier=classifier, n_trials=args.trials, cv="region", balance=balance,
                    threshold="balanced_accuracy", seed=0)
            entry = {"classifier": classifier, "balance": balance, "trials": args.trials, "cv": "region",
                     "cv_score_mean_loro_auc": r.cv_score, "threshold": r.threshold, "best_params": r.best_params,
                     "by_region": r.cv_by_value, "hbfmid": scored_on(r.pipeline, hb),
                     "seconds": round(time.perf_counter() - t, 1)}
            results.append(entry)
            print(f"\n== {classifier}, balance={balance}: mean held-out-region ROC AUC {r.cv_score:.3f}, "
                  f"threshold {r.threshold:.3f}, {entry['seconds']:.0f} s", flush=True)
            print(r.by_value_text())
            h = entry["hbfmid"]
            print("HBFMID (kept model, trained on all FracAtlas): " + ", ".join(
                f"{k} {h[k]['value']:.3f} [{h[k]['low']:.2f}-{h[k]['high']:.2f}]"
                for k in ("roc_auc", "sensitivity", "specificity")), flush=True)
            Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "store": args.store,
                                                  "fa_version": args.fa_version, "hbfmid_version": args.hbfmid_version,
                                                  "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
