"""FracAtlas helpers shared by benchmarks/ and examples/: a clean, group-aware manifest and its VGG16 store.

- Rows with ``use=0`` (exact duplicates, near copies with opposite labels, label mismatches) are left
  out, as a careful evaluation does.
- ``--limit`` keeps whole near-duplicate groups and the class ratio (a deterministic sample by a hash
  of the group id), so a small run still never splits a group.
- Optional train/val/test splits are drawn by group too.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRACFEAT_SHARED", REPO.parent / "shared")).resolve()
FRACATLAS = SHARED / "data" / "fracatlas"
VGG16_WEIGHTS = SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"


def _rank(group: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{group}".encode()).hexdigest()


def write_manifest(out_csv, data_dir=FRACATLAS, limit: int | None = None,
                   splits: tuple[float, float] | None = None, seed: int = 0) -> dict:
    """Write a CSV (absolute path, label, group[, split]) for ``extract``; returns counts.

    ``splits=(0.7, 0.15)`` gives 70% train, 15% val, the rest test, by group.
    """
    data_dir = Path(data_dir)
    with open(data_dir / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["use"] == "1"]
    if limit is not None and limit < len(rows):
        picked = []
        for label in ("fractured", "not_fractured"):
            of_label = sorted((r for r in rows if r["label"] == label), key=lambda r: (_rank(r["group"], str(seed)), r["path"]))
            picked += of_label[: round(limit * len(of_label) / len(rows))]
        rows = picked
    fields = ["path", "label", "group"] + (["split"] if splits else [])
    out = []
    for r in rows:
        row = {"path": str((data_dir / r["path"]).resolve()), "label": r["label"], "group": r["group"]}
        if splits:
            u = int(_rank(r["group"], f"split{seed}")[:8], 16) / 0xFFFFFFFF
            row["split"] = "train" if u < splits[0] else "val" if u < splits[0] + splits[1] else "test"
        out.append(row)
    out.sort(key=lambda r: r["path"])
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(out)
    counts = {"images": len(out), "fractured": sum(r["label"] == "fractured" for r in out)}
    if splits:
        for s in ("train", "val", "test"):
            counts[s] = sum(r["split"] == s for r in out)
    return counts
