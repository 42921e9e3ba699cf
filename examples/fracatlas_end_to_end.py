"""FracAtlas end to end: extract VGG16 features -> fit -> evaluate -> save -> load -> predict on image paths.

    python3 examples/fracatlas_end_to_end.py                     # all 4,002 clean radiographs, 224 px
    python3 examples/fracatlas_end_to_end.py --limit 800 --n-trials 20

Clean rows only (the manifest's use=1), train/val/test drawn by near-duplicate group (70/15/15), so no
radiograph has a near copy on the other side of a split. fit tunes on train with grouped folds; val and
test are scored once at the end. The saved model is then loaded in a fresh Python process, with no
feature store, and predicts from the JPEG files themselves.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "benchmarks")]

import joblib  # noqa: E402
import numpy as np  # noqa: E402
from fracatlas import FRACATLAS, VGG16_WEIGHTS, write_manifest  # noqa: E402

from fracfeat import evaluate, extract, fit  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", default=str(FRACATLAS))
parser.add_argument("--weights", default=str(VGG16_WEIGHTS))
parser.add_argument("--store", default="fracatlas-vgg16-store")
parser.add_argument("--limit", type=int, default=None, help="images (whole groups, class ratio kept)")
parser.add_argument("--image-size", type=int, default=224)
parser.add_argument("--classifier", default="auto")
parser.add_argument("--n-trials", type=int, default=30)
parser.add_argument("--model", default="fracatlas-vgg16.joblib")
parser.add_argument("--threads", type=int, default=None, help="threads per XGBoost fit (1 is best on a busy 2-core box)")
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(message)s")

# 1. extract: a CSV manifest with path, label, group and split columns -> a store version.
manifest = Path(tempfile.mkdtemp()) / "fracatlas.csv"
counts = write_manifest(manifest, args.data, limit=args.limit, splits=(0.7, 0.15))
t = time.perf_counter()
fs = extract(str(manifest), backbone="vgg16", weights=args.weights, image_size=args.image_size, store=args.store,
             progress=sys.stderr.isatty())
print(f"1. extract  {fs!r}\n            splits {counts}, {fs.provenance['runtime']} {fs.provenance['precision']}, "
      f"{fs.provenance['n_computed']} computed + {fs.provenance['n_reused']} from the cache, "
      f"{time.perf_counter() - t:.0f}s")

# 2. fit: Optuna over grouped folds of the train split; val/test scored after tuning.
t = time.perf_counter()
result = fit(fs, classifier=args.classifier, n_trials=args.n_trials, cv=5, seed=0, threshold="balanced_accuracy",
             n_threads=args.threads)
print(f"2. fit      {result!r}, {time.perf_counter() - t:.0f}s\n            best {result.best_params}")

# 3. evaluate: every metric per split, from the stored rows.
report = evaluate(result.pipeline, fs)
print("3. evaluate " + "split   n    ROC AUC  PR AUC  bal.acc  sens.  spec.  kappa")
for split, m in report.items():
    print(f"            {split:5s} {m['n']:4d}   {m['roc_auc']:.3f}   {m['pr_auc']:.3f}   {m['balanced_accuracy']:.3f}  "
          f"{m['sensitivity']:.3f}  {m['specificity']:.3f}  {m['cohen_kappa']:.3f}")

# 4. save: the classifier and the recipe for features, not the CNN.
joblib.dump(result.pipeline, args.model)
print(f"4. save     {args.model}: {os.path.getsize(args.model) / 1024:.0f} KiB")

# 5. load in a fresh process (no store needed) and predict from the test JPEGs themselves.
test = fs.split("test")
paths = list(test.paths[:8])
code = ("import json, sys, joblib\n"
        "pipe = joblib.load(sys.argv[1])\n"
        "paths = json.loads(sys.argv[2])\n"
        "print(json.dumps({'proba': pipe.predict_proba(paths)[:, 1].tolist(), 'pred': pipe.predict(paths).tolist()}))\n")
env = dict(os.environ, PYTHONPATH=str(HERE.parent))
t = time.perf_counter()
out = subprocess.run([sys.executable, "-c", code, args.model, json.dumps(paths)], capture_output=True, text=True,
                     env=env, check=True)
fresh = json.loads(out.stdout.strip().splitlines()[-1])
in_process = result.pipeline[1:].predict_proba(test.X[:8])[:, 1]
print(f"5. load+predict in a fresh process ({time.perf_counter() - t:.0f}s, backbone rebuilt and weights verified):")
for path, p, pred, truth in zip(paths, fresh["proba"], fresh["pred"], test.y[:8]):
    print(f"            {Path(path).name}  P(fractured)={p:.3f}  predicted={fs.classes[pred]:13s} truth={fs.classes[truth]}")
print(f"            max |P(fresh process, from JPEGs) - P(stored features)| = "
      f"{np.max(np.abs(np.array(fresh['proba']) - in_process)):.2e}")
