"""Make the small FracAtlas sample shipped in examples/data/fracatlas-sample/ from the full dataset.

    python3 examples/data/make_fracatlas_sample.py          # from the repository root

Clean rows only (the source manifest's use=1). Whole near-duplicate groups are picked, never single
images, so a grouped hold-out of the sample cannot leak. The choice is seeded; within each class, body
regions get shares by the square root of their FracAtlas counts, so rare regions (hip, shoulder) are
present while hand and leg still dominate. Every source image must decode fully (FracAtlas holds
truncated JPEGs); its group is skipped otherwise. Images are turned upright by their EXIF orientation,
downscaled with LANCZOS so the long side is at most --max-side, and re-encoded as JPEG without EXIF.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

REPO = Path(__file__).resolve().parents[2]
LABELS = ("fractured", "not_fractured")
FIELDS = ("path", "label", "group", "region", "view", "hardware")
DEFAULTS = dict(n_fractured=100, n_not_fractured=200, max_side=320, quality=85, seed=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "fracatlas",
                   help="FracAtlas folder holding manifest.csv (default: ../shared/data/fracatlas from the repo root)")
    p.add_argument("--out", type=Path, default=REPO / "examples" / "data" / "fracatlas-sample",
                   help="sample folder to (re)write (default: examples/data/fracatlas-sample)")
    p.add_argument("--n-fractured", type=int, default=DEFAULTS["n_fractured"], help="fractured images")
    p.add_argument("--n-not-fractured", type=int, default=DEFAULTS["n_not_fractured"], help="not fractured images")
    p.add_argument("--max-side", type=int, default=DEFAULTS["max_side"], help="long side in pixels, at most")
    p.add_argument("--quality", type=int, default=DEFAULTS["quality"], help="JPEG quality")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seeds the choice of groups")
    return p.parse_args(argv)


def clean_groups(source: Path) -> dict[str, dict[str, list[list[dict]]]]:
    """label -> region -> groups (each the group's use=1 rows), in a deterministic order."""
    with open(source / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["use"] == "1"]
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    out = {label: defaultdict(list) for label in LABELS}
    for gid in sorted(groups, key=int):
        members = groups[gid]
        labels, regions = {r["label"] for r in members}, {r["region"] for r in members}
        if len(labels) != 1 or len(regions) != 1:
            raise SystemExit(f"{source / 'manifest.csv'}: group {gid} mixes labels or regions among use=1 rows")
        out[labels.pop()][regions.pop()].append(members)
    return out


def region_quotas(available: dict[str, int], n: int) -> dict[str, int]:
    """Split n images over regions by the square root of their sizes, capped at what each region has."""
    quotas, open_, left = {}, dict(available), n
    while open_:
        weight = sum(math.sqrt(v) for v in open_.values())
        full = {r: v for r, v in open_.items() if v <= left * math.sqrt(v) / weight}
        if not full:
            break
        for r, v in full.items():
            quotas[r], left = v, left - v
            del open_[r]
    if open_:
        weight = sum(math.sqrt(v) for v in open_.values())
        shares = {r: left * math.sqrt(v) / weight for r, v in open_.items()}
        quotas.update({r: int(s) for r, s in shares.items()})
        by_remainder = sorted(shares, key=lambda r: (int(shares[r]) - shares[r], r))
        for r in by_remainder[: left - sum(int(s) for s in shares.values())]:
            quotas[r] += 1
    return quotas


def decodes_fully(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


def pick_groups(by_region: dict[str, list[list[dict]]], n: int, source: Path, rng: random.Random,
                label: str) -> list[dict]:
    """Rows of whole groups, n images in all: each region up to its quota, then any region to fill up."""
    for groups in by_region.values():
        rng.shuffle(groups)
    quotas = region_quotas({r: sum(map(len, g)) for r, g in by_region.items()}, n)
    picked, left_over = [], []
    for region in sorted(by_region):
        room = quotas[region]
        for members in by_region[region]:
            if len(members) > room or not all(decodes_fully(source / r["path"]) for r in members):
                left_over.append(members)
                continue
            picked += members
            room -= len(members)
    rng.shuffle(left_over)
    for members in left_over:
        if len(picked) + len(members) <= n and all(decodes_fully(source / r["path"]) for r in members):
            picked += members
    if len(picked) != n:
        raise SystemExit(f"could pick only {len(picked)} of {n} {label} images in whole, readable groups")
    return picked


def write_image(src: Path, dst: Path, max_side: int, quality: int) -> None:
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im)
    w, h = im.size
    scale = max_side / max(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    im.save(dst, "JPEG", quality=quality, optimize=True)  # no exif= or icc_profile=: metadata is dropped


def command_line(args: argparse.Namespace) -> str:
    """The command that remakes this sample, naming only options that differ from the defaults."""
    parts = ["python3 examples/data/make_fracatlas_sample.py"]
    for key, default in DEFAULTS.items():
        value = getattr(args, key)
        if value != default:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def count_table(rows: list[dict]) -> str:
    counts = Counter((r["region"], r["label"]) for r in rows)
    lines = ["| region | fractured | not fractured | all |", "|---|---:|---:|---:|"]
    for region in sorted({r for r, _ in counts}, key=lambda r: (-sum(counts[r, l] for l in LABELS), r)):
        f, n = counts[region, "fractured"], counts[region, "not_fractured"]
        lines.append(f"| {region} | {f} | {n} | {f + n} |")
    f, n = sum(r["label"] == "fractured" for r in rows), sum(r["label"] == "not_fractured" for r in rows)
    lines.append(f"| **all** | **{f}** | **{n}** | **{f + n}** |")
    return "\n".join(lines)


README = """\
# FracAtlas sample ({n} radiographs, {mb:.1f} MB of JPEGs)

A small, real sample of the FracAtlas dataset, so that fracfeat's main job runs from a fresh clone:

    python3 -m fracfeat run examples/data/fracatlas-sample/manifest.csv --out results/

- `fractured/` and `not_fractured/`: JPEG radiographs under their FracAtlas file names.
- `manifest.csv`: `path` (relative to this folder), `label`, `group` (FracAtlas' near-duplicate cluster:
  images of one group are copies or near copies of one radiograph; fracfeat keeps a group on one side
  of every split), `region` (one or several of hand, leg, hip, shoulder joined by `+`), `view`
  (frontal / lateral / oblique), `hardware` (1 = implant visible).

## How it was made

    {command}

run from the repository root on the full dataset
({source_note}).

- Clean rows only (`use=1` in that copy's manifest: no exact duplicates, no near copies with opposite
  labels, no label mismatches, no truncated files).
- Whole near-duplicate groups (never a group in part), by a seeded random choice; within each class,
  body regions get shares by the square root of FracAtlas' counts, so hip and shoulder are present
  while hand and leg still dominate.
- {fractured} of {n} images ({share:.0%}) are fractured, against 18% in FracAtlas, so that the main
  job's 20% hold-out still holds about {holdout} fractured radiographs to measure sensitivity on.
- Every source image decoded fully. Each was turned upright by its EXIF orientation, downscaled with
  LANCZOS so its long side is at most {max_side} px, and re-encoded as JPEG (quality {quality}) without
  EXIF or other metadata. Features of these images therefore differ slightly from those of the
  full-size originals, and figures measured on the sample are not FracAtlas results.

{table}

## Source, attribution and license

These images and labels are a modified subset of FracAtlas:

> Iftekharul Abedeen, Md. Ashiqur Rahman, Fatema Zohra Prottyasha, Tasnim Ahmed, Tareque Mohmud
> Chowdhury and Swakkhar Shatabda, "FracAtlas: A Dataset for Fracture Classification, Localization and
> Segmentation of Musculoskeletal Radiographs", Scientific Data 10 (2023),
> https://doi.org/10.1038/s41597-023-02432-4. Data: https://figshare.com/articles/dataset/The_dataset/22363012

FracAtlas is licensed under the Creative Commons Attribution 4.0 International License (CC BY 4.0,
https://creativecommons.org/licenses/by/4.0/), and so is this sample. Changes made: {n} of the
4,083 images were selected, downscaled and re-encoded (see above), and the manifest was derived from
the dataset's labels and annotations. The radiographs were collected from
hospitals in Bangladesh. Reuse them under CC BY 4.0, crediting the authors above.
"""


def write_sample(args: argparse.Namespace, rows: list[dict]) -> int:
    """Write images, manifest.csv and README.md into args.out; returns the total size in bytes."""
    for label in LABELS:  # remove a previous sample's images so the folder holds exactly this one
        shutil.rmtree(args.out / label, ignore_errors=True)
        (args.out / label).mkdir(parents=True)
    manifest = []
    for r in rows:
        rel = f"{r['label']}/{Path(r['path']).name}"
        write_image(args.source / r["path"], args.out / rel, args.max_side, args.quality)
        manifest.append({**{k: r[k] for k in FIELDS}, "path": rel})
    manifest.sort(key=lambda r: r["path"])
    with open(args.out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(manifest)
    images = sum((args.out / r["path"]).stat().st_size for r in manifest)
    fractured = sum(r["label"] == "fractured" for r in manifest)
    default_source = args.source.resolve() == (REPO.parent / "shared" / "data" / "fracatlas").resolve()
    text = README.format(
        n=len(manifest), mb=images / 1e6, command=command_line(args), fractured=fractured,
        share=fractured / len(manifest), holdout=round(fractured * 0.2), max_side=args.max_side,
        quality=args.quality, table=count_table(manifest),
        source_note="the development copy in ../shared/data/fracatlas" if default_source else f"--source {args.source}",
    )
    (args.out / "README.md").write_text(text)
    return sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (args.source / "manifest.csv").is_file():
        sys.exit(f"{args.source}: no manifest.csv; point --source at the FracAtlas folder")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated source must fail to decode, not pass as grey
    groups = clean_groups(args.source)
    rng = random.Random(args.seed)
    rows = []
    for label, n in zip(LABELS, (args.n_fractured, args.n_not_fractured)):
        rows += pick_groups(groups[label], n, args.source, rng, label)
    size = write_sample(args, rows)
    print(f"{args.out}: {len(rows)} images ({args.n_fractured} fractured), {size / 1e6:.2f} MB in all")
    print(count_table(rows))


if __name__ == "__main__":
    main()
