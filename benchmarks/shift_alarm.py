"""The shift alarm's rates: how often it flags images of the training source, and of another source.

Rows: FracAtlas (``--data``, the main job's manifest) and HBFMID (``--external``), VGG16 features
extracted into ``--store`` (cached: a second run computes nothing). Three measurements, each with the
alarm fitted on training rows only (fracfeat._shift.OutsideTraining, as fit keeps it in a model):

1. main split: the main job's grouped 20% hold-out of FracAtlas (fracfeat.run's); the alarm fitted on
   the other 80%; share flagged of the held-out FracAtlas images and of all HBFMID images;
2. every FracAtlas body region held out in turn (every image that shows it: "hand+leg" images are held
   out with hand and with leg): fitted on the images without it, share flagged of the held-out images (a
   shift inside one archive) and of HBFMID;
3. the out-of-fold share of the training rows themselves (the calibration target, 1 - quantile).

Intervals: 95% percentile bootstrap over groups of near-duplicates.

    python benchmarks/shift_alarm.py --store /work/stores/fracatlas \
        --weights ../shared/weights/vgg16_imagenet_notop.weights.h5
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fracfeat import extract  # noqa: E402
from fracfeat._hardware import describe_machine  # noqa: E402
from fracfeat._run import holdout_split  # noqa: E402
from fracfeat._shift import OutsideTraining  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def share_ci(flags: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """[share, low, high]: share flagged, 95% bootstrap interval resampling groups."""
    flags = np.asarray(flags, dtype=float)
    names, index = np.unique(groups, return_inverse=True)
    sums, counts = np.bincount(index, flags, len(names)), np.bincount(index, minlength=len(names))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(names), size=(n_boot, len(names)))
    boot = sums[picks].sum(1) / counts[picks].sum(1)
    return [round(float(flags.mean()), 4), *(round(float(v), 4) for v in np.percentile(boot, [2.5, 97.5]))]


def load(manifest: Path, store: str, weights: str):
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    fs = extract(manifest, store=store, weights=weights, progress=False).labeled()
    by_path = {str((manifest.parent / r["path"]).resolve()): r for r in rows}
    regions = np.array([by_path.get(str(Path(p).resolve()), {}).get("region", "") for p in fs.paths])
    return fs, regions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "fracatlas" / "manifest.csv"))
    ap.add_argument("--external", default=str(SHARED / "data" / "hbfmid" / "manifest.csv"))
    ap.add_argument("--store", required=True)
    ap.add_argument("--weights", default=str(SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shift_alarm.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    fa, regions = load(Path(args.data), args.store, args.weights)
    hb, _ = load(Path(args.external), args.store, args.weights)
    result = {"machine": describe_machine(), "features": f"store v{fa.version} / v{hb.version}",
              "detector": repr(OutsideTraining())}
    train, held, how, _ = holdout_split(fa, 0.2, 0)
    alarm = OutsideTraining().fit(train.X, groups=train.groups)
    result["main_split"] = {"hold-out": how, "train_oof": round(alarm.train_flagged_, 4),
                            "fracatlas_held_out": share_ci(alarm.predict(held.X), held.groups),
                            "hbfmid": share_ci(alarm.predict(hb.X), hb.groups)}
    print(json.dumps(result["main_split"]))
    result["regions_held_out"] = {}
    parts = np.array([set(r.split("+")) - {""} for r in regions], dtype=object)
    for region in sorted(set().union(*parts)):
        inside = np.array([region not in p for p in parts])  # "hand+leg" rows are held out with hand and with leg
        alarm = OutsideTraining().fit(fa.X[inside], groups=fa.groups[inside])
        row = {"n": int((~inside).sum()), "region": share_ci(alarm.predict(fa.X[~inside]), fa.groups[~inside]),
               "hbfmid": share_ci(alarm.predict(hb.X), hb.groups), "train_oof": round(alarm.train_flagged_, 4)}
        result["regions_held_out"][region] = row
        print(region, json.dumps(row))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
