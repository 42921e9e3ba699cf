"""benchmarks/accuracy.py end to end on a few real radiographs (real VGG16 weights), as a subprocess."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_accuracy_benchmark_runs_augmented_and_tta_rows(tmp_path, fracatlas, vgg16_weights, python, subprocess_env):
    out = tmp_path / "acc.json"
    cmd = [python, str(REPO / "benchmarks" / "accuracy.py"), "--data", str(fracatlas), "--weights", str(vgg16_weights),
           "--store", str(tmp_path / "store"), "--limit", "30", "--folds", "3", "--trials", "2", "--inner-cv", "2",
           "--n-boot", "20", "--methods", "logreg-avg+aug,logreg-cat224+448+aug", "--views", "hflip", "--tta", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"logreg-avg+aug", "logreg-avg+aug+tta", "logreg-cat224+448+aug", "logreg-cat224+448+aug+tta"}
    assert report["views"] == ["hflip"]
    assert rows["logreg-avg+aug+tta"]["tta_views"] == ["hflip"]
    # Each fold model trained on its rows and their flipped views: twice the training rows.
    for row in ("logreg-avg+aug", "logreg-cat224+448+aug"):
        for fold in rows[row]["folds"]:
            assert fold["augment"] == ["hflip"] and fold["n_train"] % 2 == 0
    assert rows["logreg-avg+aug"]["extract_images"] == 60  # 30 images, then their 30 views
    # Joined features: two scales and their two flipped views (joined too), 30 images each.
    assert rows["logreg-cat224+448+aug"]["extract_images"] == 120
    assert rows["logreg-cat224+448+aug+tta"]["extract_images"] == 120
    assert rows["logreg-cat224+448+aug"]["store_version"] == "1+3"  # avg, its view, then avg448
    assert "| logreg-avg+aug+tta |" in proc.stdout
    # Every fold model scores feature arrays with its whole head: scaling, reduction, classifier (a bug
    # once dropped the scaler of models fit on joined features, which then had no image-reading step).
    for row in ("logreg-avg+aug", "logreg-cat224+448+aug"):
        assert all(f["steps"] == ["scale", "reduce", "classifier"] for f in rows[row]["folds"])
    assert rows["logreg-cat224+448+aug"]["n_features"] == 1024
