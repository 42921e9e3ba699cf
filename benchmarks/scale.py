"""Scale: extraction images/s on a Dask LocalCluster of 1 and 2 workers against local runs, tuning trials/minute
with 1 and 2 workers on PostgreSQL, store bytes per row, and classifier fit time against row count.

    python benchmarks/scale.py --n 64 --postgres postgresql://fracfeat:fracfeat@localhost:5432/fracfeat_test

1. Extraction (real FracAtlas images, VGG16 with its real ImageNet weights at --image-size):
   - forward-only: the backbone alone on decoded pixels, every worker at once (Client.run), summed;
   - end to end: extract() into a new store (hash, decode, forward, checkpoints, commit), wall time;
     on the cluster (warm workers: each built its backbone on a warm-up call first) and locally at the
     same process count (1: this process; 2: two warm child processes, each half, into one store side by
     side). The distributed path's overhead is its wall time over the local one's.
2. Tuning (--tune-n images at 64 px, logistic regression, 3 grouped folds): trials/minute of one fit in
   memory, one fit on PostgreSQL, and one fit plus one `fracfeat tune-worker` process on PostgreSQL.
3. Fit time per classifier family on n rows (real feature rows resampled with noise, 512 wide).

Everything alternates in one run on the same machine; figures are medians over --repeats. Writes
benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402
from fracatlas import FRACATLAS, VGG16_WEIGHTS, write_manifest  # noqa: E402

from fracfeat import ExtractorSettings, FeatureStore, extract, fit  # noqa: E402
from fracfeat._hardware import describe_machine  # noqa: E402

LOCAL_CHILD = r"""
import json, os, sys, time
from fracfeat import extract
args = json.loads(sys.argv[1])
paths = [l.split(",")[0] for l in open(args["manifest"]).read().splitlines()[1:]]
extract(paths[:2], store=args["warm_store"], **args["settings"])  # TensorFlow and the backbone warm
print("ready", flush=True)
while not os.path.exists(args["go"]):
    time.sleep(0.01)
t0 = time.time()
extract(paths[args["start"]:args["stop"]], store=args["store"], **args["settings"])
print(json.dumps({"start": t0, "end": time.time()}), flush=True)
"""


def forward_rate(image_size: int, weights: str, n: int = 64) -> float:
    """On one process: images/s of the backbone alone on decoded pixels (batches of 32, after one warm batch)."""
    from fracfeat._distributed import worker_engine

    config, resolved = ExtractorSettings.from_kwargs("extract", backbone="vgg16", image_size=image_size).resolve(weights)
    engine = worker_engine(config, resolved)
    batch = np.random.default_rng(0).integers(0, 255, (32, config.decode_size, config.decode_size, 3), dtype=np.uint8)
    engine.forward(batch)
    t0 = time.perf_counter()
    for _ in range(max(1, n // 32)):
        engine.forward(batch)
    return max(1, n // 32) * 32 / (time.perf_counter() - t0)


def backbone_build_seconds(image_size: int, weights: str) -> float:
    """What a local extract() spends building its backbone (each call builds one): the first forward pass of a
    new engine (build, weights, tracing) less a second one."""
    from fracfeat._engine import FeatureEngine

    config, resolved = ExtractorSettings.from_kwargs("extract", backbone="vgg16", image_size=image_size).resolve(weights)
    batch = np.zeros((32, config.decode_size, config.decode_size, 3), dtype=np.uint8)
    engine = FeatureEngine(config, resolved)
    t0 = time.perf_counter()
    engine.forward(batch)
    t1 = time.perf_counter()
    engine.forward(batch)
    return max(0.0, (t1 - t0) - (time.perf_counter() - t1))


def local_side_by_side(manifest: Path, n: int, k: int, settings: dict, work: Path) -> float:
    """Wall seconds for k warm local processes, each extracting 1/k of the images into one store at once."""
    go = work / f"go-{uuid.uuid4().hex}"
    store = work / f"local{k}-{uuid.uuid4().hex[:6]}"
    children = []
    for i in range(k):
        args = dict(manifest=str(manifest), warm_store=str(work / f"warm-{i}"), go=str(go), store=str(store),
                    start=i * n // k, stop=(i + 1) * n // k, settings=settings)
        children.append(subprocess.Popen([sys.executable, "-c", LOCAL_CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                                         text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)}))
    for c in children:
        assert c.stdout.readline().strip() == "ready"
    go.touch()
    spans = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    assert all(c.returncode == 0 for c in children)
    return max(s["end"] for s in spans) - min(s["start"] for s in spans)


def extraction(args, manifest: Path, work: Path) -> dict:
    """Images/s per worker count: forward-only and end to end, on the cluster and locally."""
    from distributed import Client, LocalCluster

    settings = dict(backbone="vgg16", weights=args.weights, image_size=args.image_size, progress=False)
    paths = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    out = {}
    for k in (1, 2):
        rows = {"forward": [], "cluster": [], "local": [], "build": []}
        with LocalCluster(n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            extract(paths[:2 * k], store=work / f"warm-cluster{k}", client=client, batch_size=1, **settings)
            for _ in range(args.repeats):
                rates = client.run(forward_rate, args.image_size, args.weights)
                rows["forward"].append(sum(rates.values()))
                t0 = time.perf_counter()
                extract(paths, store=work / f"cluster{k}-{uuid.uuid4().hex[:6]}", client=client, **settings)
                rows["cluster"].append(time.perf_counter() - t0)
                extract(paths[:2], store=work / "warm-here", **settings)  # TensorFlow warm here, as in the children
                rows["build"].append(backbone_build_seconds(args.image_size, args.weights))
                if k == 1:
                    t0 = time.perf_counter()
                    extract(paths, store=work / f"here-{uuid.uuid4().hex[:6]}", **settings)
                    rows["local"].append(time.perf_counter() - t0)
                else:
                    rows["local"].append(local_side_by_side(manifest, len(paths), k, settings, work))
        med = {key: statistics.median(v) for key, v in rows.items()}
        out[k] = {"forward_images_per_s": round(med["forward"], 2),
                  "cluster_images_per_s": round(len(paths) / med["cluster"], 2),
                  "local_images_per_s": round(len(paths) / med["local"], 2),
                  "cluster_over_local_time": round(med["cluster"] / med["local"], 3),
                  # each local extract() builds its backbone; warm cluster workers built theirs before
                  "local_build_seconds": round(med["build"], 2),
                  "cluster_over_local_time_build_excluded": round(med["cluster"] / max(med["local"] - med["build"],
                                                                                       1e-9), 3)}
    return out


def study_minutes(study) -> float:
    trials = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds() / 60


def tuning(args, work: Path) -> tuple[dict, object]:
    """Trials/minute: in memory, on PostgreSQL alone, on PostgreSQL with one tune-worker process beside."""
    manifest = work / "tune.csv"
    write_manifest(manifest, limit=args.tune_n)
    fs = extract(manifest, store=work / "tune-store", backbone="vgg16", weights=args.weights, image_size=64,
                 progress=False)
    common = dict(classifier="logreg", n_trials=args.trials, cv=3, seed=0)
    rows = {"memory_1": [], "postgres_1": [], "postgres_2": []}
    for _ in range(args.repeats):
        rows["memory_1"].append(args.trials / study_minutes(fit(fs, **common).study))
        if not args.postgres:
            continue
        rows["postgres_1"].append(args.trials / study_minutes(
            fit(fs, storage=args.postgres, study_name=f"scale-{uuid.uuid4().hex}", **common).study))
        name = f"scale-{uuid.uuid4().hex}"
        log = work / f"{name}.log"
        with open(log, "w") as err:
            worker = subprocess.Popen([sys.executable, "-m", "fracfeat", "tune-worker", f"{fs.store}@{fs.version}",
                                       "--storage", args.postgres, "--study", name, "--trials", str(args.trials)],
                                      stderr=err, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(HERE.parent), "PYTHONWARNINGS": "ignore"})
        while "not started yet" not in log.read_text():  # the worker is up, polling for the study
            assert worker.poll() is None, log.read_text()
            time.sleep(0.1)
        study = fit(fs, storage=args.postgres, study_name=name, **common).study
        worker.communicate(timeout=600)
        rows["postgres_2"].append(len(study.trials) / study_minutes(study))
    return {k: round(statistics.median(v), 1) for k, v in rows.items() if v}, fs


def fit_times(fs, sizes, repeats: int) -> dict:
    """Seconds of one fit per family on n rows (real rows resampled, small noise added), median of repeats."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC
    from xgboost import XGBClassifier

    rng = np.random.default_rng(0)
    X0, y0 = np.asarray(fs.X, np.float32), np.asarray(fs.y)
    families = {"logreg": lambda: LogisticRegression(C=0.1, max_iter=300),
                "svm": lambda: SVC(C=1.0, kernel="rbf", gamma="scale"),
                "xgboost": lambda: XGBClassifier(n_estimators=200, max_depth=4, tree_method="hist", n_jobs=1)}
    out = {}
    for n in sizes:
        pick = rng.integers(0, len(y0), n)
        X = X0[pick] + rng.normal(0, 0.05 * X0.std(), (n, X0.shape[1])).astype(np.float32)
        X = (X - X.mean(0)) / (X.std(0) + 1e-6)
        for name, make in families.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                make().fit(X, y0[pick])
                times.append(time.perf_counter() - t0)
            out.setdefault(name, {})[n] = round(statistics.median(times), 3)
    return out


def store_bytes_per_row(root: Path) -> float:
    """Bytes of the latest version file per row (features, ids, paths and the rest, as stored)."""
    store = FeatureStore(root)
    version_file = max((root / "versions").glob("v*.h5"))
    return version_file.stat().st_size / len(store.open("latest"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images per extraction")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--weights", default=str(VGG16_WEIGHTS))
    p.add_argument("--tune-n", type=int, default=400, help="images whose features the tuning part uses")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--postgres", default=os.environ.get("FRACFEAT_TEST_POSTGRES"), help="PostgreSQL URL")
    p.add_argument("--fit-sizes", default="1000,2000,4000")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fracfeat-scale-") as tmp:
        work = Path(tmp)
        manifest = work / "images.csv"
        write_manifest(manifest, data_dir=FRACATLAS, limit=args.n)
        result = {"n_images": sum(1 for _ in open(manifest)) - 1, "image_size": args.image_size,
                  "machine": describe_machine(), "cores": os.cpu_count(),
                  "extraction": extraction(args, manifest, work)}
        result["tuning_trials_per_minute"], fs = tuning(args, work)
        result["tuning"] = {"images": len(fs), "classifier": "logreg", "cv": 3, "trials": args.trials}
        result["fit_seconds"] = fit_times(fs, [int(s) for s in args.fit_sizes.split(",")], args.repeats)
        local_store = next(work.glob("here-*"))
        result["store_bytes_per_row_vgg16"] = round(store_bytes_per_row(local_store), 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(r: dict) -> None:
    m = r["machine"]
    print(f"on {m['cpu']} ({m['cpu_count']} cores; {' '.join(m['cpu_flags'])}; GPU: {m['gpu']})")
    print(f"extraction: {r['n_images']} FracAtlas images, VGG16 ImageNet at {r['image_size']} px, {r['cores']} cores")
    print("workers | forward-only img/s | cluster end-to-end img/s | local end-to-end img/s | cluster/local time "
          "| same, local backbone build excluded")
    for k, e in r["extraction"].items():
        print(f"{k:>7} | {e['forward_images_per_s']:>18} | {e['cluster_images_per_s']:>24} | "
              f"{e['local_images_per_s']:>22} | {e['cluster_over_local_time']:>18} | "
              f"{e['cluster_over_local_time_build_excluded']} (build {e['local_build_seconds']} s)")
    t = r["tuning"]
    print(f"tuning: {t['images']} images, {t['classifier']}, {t['cv']} folds, {t['trials']} trials; trials/minute: "
          + ", ".join(f"{k} {v}" for k, v in r["tuning_trials_per_minute"].items()))
    print("fit seconds (one fit, n rows x 512): " + "; ".join(
        f"{fam} " + ", ".join(f"{n}: {s}" for n, s in v.items()) for fam, v in r["fit_seconds"].items()))
    print(f"store: {r['store_bytes_per_row_vgg16']} bytes per VGG16 row (512 float32, gzip level 1)")


if __name__ == "__main__":
    main()
