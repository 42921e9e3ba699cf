"""Measure fracfeat.adapt and fracfeat.recalibrate on real data (issue 15, item 3).

Features: the store /work/stores/fracatlas (VGG16 224 px average-pooled bfloat16): version 1, FracAtlas'
use == 1 rows (4,059 images), and the version made from HBFMID's manifest (580 images, same fingerprint).
Models: fracfeat.fit(classifier="svm", n_trials=15, cv=5, threshold="balanced_accuracy") on all of FracAtlas;
for each held-out body region (FracAtlas' region column folded shoulder > hip > leg > hand, as in
benchmarks/research_issue15), the configuration tuned on all of FracAtlas refitted by fracfeat.fit on the
other three (one enqueued trial: grouped CV, threshold, shift alarm all as fit makes them).

Scored at each model's kept threshold: ROC AUC, sensitivity, specificity with 95% group-bootstrap intervals
(fracfeat._validation.bootstrap_ci, 1,000 resamples of near-duplicate groups; figures per image). Methods:
none, adapt(method="standardize"), and CORAL (target -> training, regularized by the identity, as the research
measured it) as the candidate second method. Then recalibrate with 48 HBFMID labels drawn by group (4
not-fractured groups + fractured groups up to 48 images; HBFMID has only 9 not-fractured groups), scored on
the rest, over 20 draws.

    nice -n 15 python benchmarks/adapt_measure.py [--out benchmarks/results/adapt_measure.json] [--draws 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np

STORE = "/work/stores/fracatlas"
FA_MANIFEST = "/work/shared/data/fracatlas/manifest.csv"
REGIONS = ("hand", "leg", "hip", "shoulder")


def region_fold(region: str) -> str:
    for k in ("shoulder", "hip", "leg"):
        if k in region:
            return k
    return "hand"


def fracatlas_rows(store):
    """FracAtlas' use == 1 rows of version 1 and the region fold of each."""
    fs = store.open(1)
    manifest = {os.path.join(os.path.dirname(FA_MANIFEST), r["path"]): r for r in csv.DictReader(open(FA_MANIFEST))}
    keep = [i for i, p in enumerate(fs.paths) if manifest[p]["use"] == "1"]
    sub = fs.subset(np.array(keep))
    return sub, np.array([region_fold(manifest[p]["region"]) for p in sub.paths])


def hbfmid_rows(store):
    for v in reversed(store.versions()):
        if "hbfmid" in str(store.provenance(v.version).get("source", "")):
            return store.open(v.version)
    raise SystemExit("no HBFMID version in the store")


def coral_rows(train_X, site_X, lam=1.0):
    """CORAL target -> training in the training-standardized space (the research's map)."""
    mu, sd = train_X.mean(0), train_X.std(0) + 1e-8
    Zs, Zt = (train_X - mu) / sd, (site_X - mu) / sd

    def sqrtm(C, inv):
        vals, vecs = np.linalg.eigh(C)
        return (vecs * np.clip(vals, 1e-8, None) ** (-0.5 if inv else 0.5)) @ vecs.T
    eye = lam * np.eye(Zs.shape[1])
    A = sqrtm(np.cov(Zt, rowvar=False) + eye, True) @ sqrtm(np.cov(Zs, rowvar=False) + eye, False)
    return (((Zt - Zt.mean(0)) @ A) * sd + mu).astype(np.float32)


def figures(y, p, pred, groups):
    from fracfeat._validation import bootstrap_ci

    ci = bootstrap_ci(y, p, pred, groups, n_boot=1000, seed=0)
    return {k: ci[k] for k in ("roc_auc", "sensitivity", "specificity")}


def show(m) -> str:
    return "  ".join(f"{k[:4]} {m[k]['value']:.2f} [{m[k]['low']:.2f}-{m[k]['high']:.2f}]"
                     for k in ("roc_auc", "sensitivity", "specificity"))


def score_methods(pipeline, train_X, target, name):
    """none / standardize / coral on one target FeatureSet, at the model's kept threshold."""
    from fracfeat import adapt

    y, groups = np.asarray(target.y), np.asarray(target.groups)
    X = np.asarray(target.X, np.float32)
    head = pipeline[1:]
    out = {}
    t = time.perf_counter()
    adapted = adapt(pipeline, target, min_images=100)
    adapt_s = time.perf_counter() - t
    for method, h, Xm in (("none", head, X), ("standardize", adapted[1:], X),
                          ("coral", head, coral_rows(train_X, X))):
        out[method] = figures(y, h.predict_proba(Xm)[:, 1], h.predict(Xm), groups)
        print(f"{name:9s} {method:12s} {show(out[method])}", flush=True)
    out["adapt_seconds"] = adapt_s
    out["alarm_before"] = adapted.adapted_to_["outside_training_before"]
    out["alarm_after"] = adapted.adapted_to_["outside_training_after"]
    out["n"], out["n_positive"] = int(len(y)), int(y.sum())
    print(f"{name:9s} alarm flagged before {out['alarm_before']:.2f} after {out['alarm_after']:.2f}; "
          f"adapt {adapt_s:.1f} s", flush=True)
    return out, adapted


def refit_without(fa, regions, held, best_params):
    """The configuration tuned on all FracAtlas, refitted by fracfeat.fit on the other regions."""
    import optuna

    from fracfeat import fit

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(best_params)
    return fit(fa.subset(np.flatnonzero(regions != held)), classifier="svm", n_trials=1, cv=5,
               threshold="balanced_accuracy", study=study, seed=0)


def draw_labels(rng, y, groups, n=48, n_negative_groups=4):
    ug, inv, size = np.unique(groups, return_inverse=True, return_counts=True)
    glab = np.zeros(len(ug), int)
    glab[inv] = y
    neg = rng.permutation(np.flatnonzero(glab == 0))[:n_negative_groups]
    pos = rng.permutation(np.flatnonzero(glab == 1))
    k = int(np.searchsorted(np.cumsum(size[pos]), n - size[neg].sum())) + 1
    return np.isin(inv, np.r_[neg, pos[:k]])


def recalibration_draws(models: dict, hb, draws: int):
    """recalibrate on 48 labeled HBFMID images (force=True, so every draw is scored; refusals counted)."""
    from fracfeat import recalibrate

    y, groups, X = np.asarray(hb.y), np.asarray(hb.groups), np.asarray(hb.X, np.float32)
    out = {}
    for name, model in models.items():
        rows = []
        for d in range(draws):
            lab = draw_labels(np.random.default_rng(d), y, groups)
            t = time.perf_counter()
            rec = recalibrate(model, hb.subset(np.flatnonzero(lab)), min_labels=48, min_per_class=4, force=True,
                              n_boot=1000, seed=d)
            sec = time.perf_counter() - t
            r = rec.recalibrated_to_
            rest = ~lab
            p_old = model[1:].predict_proba(X[rest])[:, 1]
            p_new, pred = rec[1:].predict_proba(X[rest])[:, 1], rec[1:].predict(X[rest])
            m = figures(y[rest], p_new, pred, groups[rest])
            rows.append({"labeled": int(lab.sum()), "labeled_negative": int((y[lab] == 0).sum()),
                         "slope": r["slope"], "slope_low": r["slope_low"], "slope_high": r["slope_high"],
                         "refused": bool(r["slope"] <= 0 or r["slope_low"] <= 0), "threshold": r["threshold"],
                         "threshold_range": [r["threshold_low"], r["threshold_high"]],
                         "rest_brier_before": float(np.mean((p_old - y[rest]) ** 2)),
                         "rest_brier_after": float(np.mean((p_new - y[rest]) ** 2)),
                         "rest": m, "seconds": sec})
            print(f"recal {name:11s} draw {d:2d} slope {r['slope']:+.2f} [{r['slope_low']:+.2f},{r['slope_high']:+.2f}]"
                  f" thr {r['threshold']:.2f} rest brier {rows[-1]['rest_brier_before']:.3f}->"
                  f"{rows[-1]['rest_brier_after']:.3f} {show(m)} ({sec:.1f} s)", flush=True)
        out[name] = rows
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/adapt_measure.json")
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()
    from fracfeat import FeatureStore, fit

    t0 = time.perf_counter()
    store = FeatureStore(STORE)
    fa, regions = fracatlas_rows(store)
    hb = hbfmid_rows(store)
    result = {"store": STORE, "n_fracatlas": len(fa), "n_hbfmid": len(hb)}
    t = time.perf_counter()
    full = fit(fa, classifier="svm", n_trials=15, cv=5, threshold="balanced_accuracy", seed=0)
    result["fit"] = {"seconds": time.perf_counter() - t, "cv": full.cv_score, "threshold": full.threshold,
                     "params": full.best_params}
    print(f"fit all FracAtlas: cv {full.cv_score:.3f}, threshold {full.threshold:.3f}, "
          f"{result['fit']['seconds']:.0f} s", flush=True)
    X_fa = np.asarray(fa.X, np.float64)
    result["hbfmid"], adapted = score_methods(full.pipeline, X_fa, hb, "hbfmid")
    for held in REGIONS:
        t = time.perf_counter()
        part = refit_without(fa, regions, held, full.best_params)
        rows = np.flatnonzero(regions == held)
        result[held], _ = score_methods(part.pipeline, X_fa[regions != held], fa.subset(rows), held)
        result[held].update(refit_seconds=time.perf_counter() - t, threshold=part.threshold)
    result["recalibrate"] = recalibration_draws({"none": full.pipeline, "standardize": adapted}, hb, args.draws)
    result["wall_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(f"wall {result['wall_seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
