"""The FracAtlas sample shipped in examples/data/fracatlas-sample/: complete, decodable, grouped, small,
and enough for the CLI's main job from a fresh clone."""

from __future__ import annotations

import csv
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from conftest import REPO, manifest_rows

SAMPLE = REPO / "examples" / "data" / "fracatlas-sample"
MAX_SIDE = 320


def sample_rows() -> list[dict]:
    with open(SAMPLE / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_manifest_lists_exactly_the_images_on_disk():
    rows = sample_rows()
    assert list(rows[0]) == ["path", "label", "group", "region", "view", "hardware"]
    listed = [r["path"] for r in rows]
    on_disk = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*.jpg"))
    assert len(set(listed)) == len(listed)
    assert sorted(listed) == on_disk
    assert all(r["path"].split("/")[0] == r["label"] for r in rows)


def test_class_and_region_counts_match_the_readme():
    rows = sample_rows()
    readme = (SAMPLE / "README.md").read_text()
    stated = re.search(r"\| \*\*all\*\* \| \*\*(\d+)\*\* \| \*\*(\d+)\*\* \|", readme)
    counts = Counter(r["label"] for r in rows)
    assert (counts["fractured"], counts["not_fractured"]) == tuple(map(int, stated.groups()))
    assert counts["fractured"] > 0 and counts["not_fractured"] > 0
    for region, n in Counter((r["region"], r["label"]) for r in rows).items():
        line = re.search(rf"^\| {re.escape(region[0])} \| (\d+) \| (\d+) \|", readme, re.M)
        assert int(line.group(1 if region[1] == "fractured" else 2)) == n, region


def test_every_image_decodes_fully_upright_small_and_without_exif(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    for r in sample_rows():
        with Image.open(SAMPLE / r["path"]) as im:
            im.load()  # raises OSError on a truncated file
            assert im.format == "JPEG" and max(im.size) <= MAX_SIDE, r["path"]
            assert not im.getexif(), r["path"]


def test_groups_are_whole_and_single_label():
    by_group = defaultdict(set)
    for r in sample_rows():
        by_group[r["group"]].add(r["label"])
    assert all(len(labels) == 1 for labels in by_group.values())


def test_groups_match_fracatlas_and_are_complete(fracatlas):
    source = {Path(r["path"]).name: r for r in manifest_rows() if r["use"] == "1"}
    sample = {Path(r["path"]).name: r for r in sample_rows()}
    for name, r in sample.items():
        assert source[name]["group"] == r["group"] and source[name]["label"] == r["label"], name
    picked = {r["group"] for r in sample.values()}
    whole = {name for name, r in source.items() if r["group"] in picked}
    assert whole == set(sample), "a group is in the sample only in part"


def test_sample_is_small():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 8e6, f"{SAMPLE} is {total / 1e6:.1f} MB"


@pytest.mark.slow
def test_main_job_runs_on_the_sample(tmp_path, subprocess_env, python):
    out = tmp_path / "run"
    cmd = [python, "-m", "fracfeat", "run", str(SAMPLE / "manifest.csv"), "--out", str(out), "--weights", "none",
           "--image-size", "32", "--classifier", "logreg", "--trials", "2", "--quiet"]
    done = subprocess.run(cmd, env=subprocess_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "model.joblib").is_file()
    assert (out / "report" / "index.html").is_file()
