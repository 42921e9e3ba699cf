"""Shared fixtures: real radiographs from ../shared, tiny settings for fast tests."""

from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRACFEAT_SHARED", REPO.parent / "shared")).resolve()
FRACATLAS = SHARED / "data" / "fracatlas"
VGG16_WEIGHTS = SHARED / "weights" / "vgg16_imagenet_notop.weights.h5"

# Fast settings: seeded random weights and a tiny input keep a forward pass in milliseconds.
TINY = dict(backbone="vgg16", weights=None, image_size=32, progress=False)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# "auto" picks its path from the tables, never by timing candidates (fracfeat._path_choice): a test's
# result must not depend on the machine's load. tests/test_path_choice.py turns calibration on itself.
os.environ.setdefault("FRACFEAT_CALIBRATE", "off")


def manifest_rows() -> list[dict]:
    with open(FRACATLAS / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def fracatlas() -> Path:
    if not (FRACATLAS / "manifest.csv").is_file():
        pytest.skip(f"real radiographs not found at {FRACATLAS} (set FRACFEAT_SHARED to the shared/ folder)")
    return FRACATLAS


@pytest.fixture(scope="session")
def vgg16_weights() -> Path:
    if not VGG16_WEIGHTS.is_file():
        pytest.skip(f"VGG16 ImageNet weights not found at {VGG16_WEIGHTS}")
    return VGG16_WEIGHTS


@pytest.fixture(scope="session")
def real_images(fracatlas) -> dict[str, list[Path]]:
    """A few clean real radiographs per class (use=1 rows), paths into the shared folder."""
    rows = [r for r in manifest_rows() if r["use"] == "1"]
    out = {}
    for label in ("fractured", "not_fractured"):
        out[label] = [fracatlas / r["path"] for r in rows if r["label"] == label][:6]
    return out


@pytest.fixture()
def class_folder(tmp_path, real_images) -> Path:
    """dataset/{fractured,not_fractured}/ holding 6 + 6 real radiographs."""
    root = tmp_path / "dataset"
    for label, paths in real_images.items():
        (root / label).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, root / label / p.name)
    return root


@pytest.fixture(autouse=True)
def _fracfeat_logger_restored():
    """Tests that call ``fracfeat.cli.main`` in-process get its logging set-up (own handler, no
    propagation, --quiet's level); undo it so later tests' caplog still sees fracfeat's records."""
    import logging

    log = logging.getLogger("fracfeat")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])  # setLevel, not .level: it also clears logging's per-logger level cache
    log.propagate = saved[2]


@pytest.fixture()
def subprocess_env() -> dict:
    """Environment for child processes that import this checkout's fracfeat."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


@pytest.fixture()
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory, fracatlas):
    """A labeled FeatureSet of 48 real radiographs (24 per class, with their near-duplicate groups),
    extracted with TINY settings into a session store (``fs.store``). For fit/evaluate tests."""
    from fracfeat import extract

    rows = [r for r in manifest_rows() if r["use"] == "1"]
    picked = [r for r in rows if r["label"] == "fractured"][:24] + [r for r in rows if r["label"] == "not_fractured"][:24]
    store = tmp_path_factory.mktemp("tiny-features") / "store"
    return extract([fracatlas / r["path"] for r in picked], labels=[r["label"] for r in picked],
                   groups=[r["group"] for r in picked], store=store, **TINY)
