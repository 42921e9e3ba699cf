"""FeatureStore: versions, open by number or "latest", diff, provenance, plain-h5py access, atomicity basics."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fracfeat import FeatureStore, StoreError, extract

from conftest import REPO, TINY

DOC = REPO / "docs" / "store-format.md"


def _write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, real_images):
    """v1: images a, b, c, d. v2: a removed, e and f added, b relabeled, c moved to another path."""
    root = tmp_path_factory.mktemp("two_versions")
    img = root / "img"
    img.mkdir()
    src = real_images["fractured"][:3] + real_images["not_fractured"][:3]
    names = dict(zip("abcdef", src))
    for k, p in names.items():
        shutil.copy(p, img / f"{k}.jpg")
    shutil.copy(img / "c.jpg", img / "c_renamed.jpg")
    v1 = _write_manifest(root / "v1.csv", [("img/a.jpg", "fractured"), ("img/b.jpg", "fractured"),
                                           ("img/c.jpg", "fractured"), ("img/d.jpg", "not_fractured")])
    v2 = _write_manifest(root / "v2.csv", [("img/b.jpg", "not_fractured"), ("img/c_renamed.jpg", "fractured"),
                                           ("img/d.jpg", "not_fractured"), ("img/e.jpg", "not_fractured"),
                                           ("img/f.jpg", "not_fractured")])
    store = root / "store"
    fs1 = extract(v1, store=store, description="first four", **TINY)
    v1_bytes = hashlib.sha256((store / "versions" / "v000001.h5").read_bytes()).hexdigest()
    fs2 = extract(v2, store=store, **TINY)
    return dict(root=root, store=store, img=img, fs1=fs1, fs2=fs2, v1_sha256=v1_bytes)


def test_versions_are_listed_oldest_first(two_versions):
    infos = FeatureStore(two_versions["store"]).versions()
    assert [v.version for v in infos] == [1, 2]
    assert [v.n_images for v in infos] == [4, 5]
    assert [v.parent for v in infos] == [0, 1]
    assert all((v.backbone, v.image_size, v.pooling, v.n_features) == ("vgg16", 32, "avg", 512) for v in infos)
    assert re.match(r"v2  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  vgg16 32px avg  5 images x 512  0 failed, from v1  csv:",
                    infos[1].describe())
    assert two_versions["fs2"].provenance["n_computed"] == 2  # only e and f were new


@pytest.mark.parametrize("selector, expected", [(1, 1), ("1", 1), ("v1", 1), (2, 2), ("latest", 2), (None, 2)])
def test_open_by_number_or_latest(two_versions, selector, expected):
    fs = FeatureStore(two_versions["store"]).open(selector)
    assert fs.version == expected
    reference = two_versions[f"fs{expected}"]
    assert np.array_equal(fs.X, reference.X)
    assert list(fs.ids) == list(reference.ids)
    assert fs.provenance["version"] == expected


def test_open_a_missing_version_lists_the_existing_ones(two_versions):
    store = FeatureStore(two_versions["store"])
    with pytest.raises(StoreError, match="has no version 7; it has v1, v2"):
        store.open(7)
    with pytest.raises(StoreError, match="'newest'"):
        store.open("newest")


def test_diff_added_removed_relabeled_moved(two_versions):
    img = two_versions["img"]
    d = FeatureStore(two_versions["store"]).diff(1, "latest")
    assert (d.a, d.b) == (1, 2)
    assert d.added == [str(img / "e.jpg"), str(img / "f.jpg")]
    assert d.removed == [str(img / "a.jpg")]
    assert d.relabeled == [(str(img / "b.jpg"), 1, 0)]
    assert d.moved == [(str(img / "c.jpg"), str(img / "c_renamed.jpg"))]
    assert d.summary() == "v1 -> v2: 2 added, 1 removed, 1 relabeled, 1 moved"
    assert not d.unchanged
    assert FeatureStore(two_versions["store"]).diff(2, 2).unchanged


def test_provenance_holds_what_the_issue_lists(two_versions):
    import keras

    store = FeatureStore(two_versions["store"])
    p1, p2 = store.provenance(1), store.provenance("latest")
    for key, value in {
        "backbone": "vgg16", "image_size": 32, "pooling": "avg", "preprocessing": "caffe",
        "weights": "random:he-normal:seed=0",
        "keras_version": keras.__version__, "keras_backend": keras.backend.backend(),
        "fracfeat_version": __import__("fracfeat").__version__, "version": 1, "parent": 0,
        "description": "first four", "n_images": 4, "n_features": 512,
    }.items():
        assert p1[key] == value, key
    assert p1["precision"] in ("float32", "bfloat16", "float16")  # "auto" resolved for this machine
    assert p1["runtime"] in ("keras", "openvino")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p1["created"])
    assert p1["source"] == f"csv:{(two_versions['root'] / 'v1.csv').resolve()}"
    assert (p2["version"], p2["parent"]) == (2, 1)
    assert p1["fingerprint"] == p2["fingerprint"] == two_versions["fs1"].fingerprint


def test_a_written_version_never_changes(two_versions):
    v1 = two_versions["store"] / "versions" / "v000001.h5"
    assert hashlib.sha256(v1.read_bytes()).hexdigest() == two_versions["v1_sha256"]


def test_every_version_verifies(two_versions):
    reports = FeatureStore(two_versions["store"]).verify()
    assert [(r.version, r.ok) for r in reports] == [(1, True), (2, True)]


def _doc_snippet() -> str:
    """The runnable plain-h5py snippet of docs/store-format.md (the first ```python block)."""
    text = DOC.read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, f"{DOC} has no ```python block"
    return match.group(1)


def test_documented_h5py_snippet_reads_the_store_without_fracfeat(two_versions, tmp_path):
    """Run the docs' snippet in a child process that never imports fracfeat; compare with open()."""
    work = tmp_path / "reader"
    work.mkdir()
    shutil.copytree(two_versions["store"], work / "fracfeat-store")
    check = (
        "\nimport sys, numpy\n"
        "assert 'fracfeat' not in sys.modules\n"
        "numpy.savez('out.npz', X=X, ids=numpy.asarray(ids, str), labels=labels, paths=numpy.asarray(paths, str))\n"
        "print(provenance['backbone'], provenance['version'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _doc_snippet() + check], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["vgg16", "2"]
    out = np.load(work / "out.npz")
    fs = two_versions["fs2"]
    assert np.array_equal(out["X"], fs.X)
    assert list(out["ids"]) == list(fs.ids)
    assert list(out["labels"]) == list(fs.y)
    assert list(out["paths"]) == list(fs.paths)


@pytest.mark.skipif(shutil.which("h5dump") is None or shutil.which("h5ls") is None,
                    reason="HDF5 command-line tools not installed (Debian/Ubuntu: apt-get install hdf5-tools)")
def test_hdf5_command_line_tools_read_the_store(two_versions):
    v2 = str(two_versions["store"] / "versions" / "v000002.h5")
    fs = two_versions["fs2"]
    listing = subprocess.run(["h5ls", v2], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^features\s+Dataset \{5, 512\}", listing, re.M)
    for name in ("ids", "labels", "paths", "groups", "splits", "class_names", "failures"):
        assert re.search(rf"^{name}\s", listing, re.M), name
    labels = subprocess.run(["h5dump", "-d", "/labels", "-y", "-w", "0", v2], capture_output=True, text=True,
                            check=True).stdout
    assert [int(v) for v in re.search(r"DATA \{\s*(.*?)\s*\}", labels, re.S).group(1).split(",")] == list(fs.y)
    ids = subprocess.run(["h5dump", "-d", "/ids", "-y", "-w", "0", v2], capture_output=True, text=True,
                         check=True).stdout
    assert re.findall(r'"([0-9a-f]{64})"', ids) == list(fs.ids)
    prov = subprocess.run(["h5dump", "-a", "/provenance", v2], capture_output=True, text=True, check=True).stdout
    assert '\\"backbone\\": \\"vgg16\\"' in prov or '"backbone": "vgg16"' in prov


def test_a_leftover_tmp_file_is_never_a_version(tmp_path, real_images):
    """A killed writer leaves its half-written file in tmp/; readers never see it, the next writer removes it."""
    import h5py

    store = tmp_path / "store"
    imgs = real_images["fractured"][:2]
    extract(imgs, store=store, **TINY)
    leftover = store / "tmp" / "0123456789abcdef.h5"
    with h5py.File(leftover, "w") as f:  # what a writer killed mid-way leaves behind
        f.create_dataset("features", shape=(100, 512), dtype="float32")
        f.attrs["complete"] = 0
    (store / "tmp" / "marker-dead").write_text("{")

    fs_store = FeatureStore(store)
    assert [v.version for v in fs_store.versions()] == [1]
    assert fs_store.open("latest").version == 1

    again = extract(imgs + real_images["not_fractured"][:1], store=store, **TINY)
    assert again.version == 2
    assert list((store / "tmp").iterdir()) == []
    assert [v.version for v in fs_store.versions()] == [1, 2]


def test_committed_versions_are_marked_complete(two_versions):
    import h5py

    for n in (1, 2):
        with h5py.File(two_versions["store"] / "versions" / f"v{n:06d}.h5", "r") as f:
            assert int(f.attrs["complete"]) == 1
            assert f.attrs["format"] == "fracfeat-store"
            assert int(f.attrs["version"]) == n
    marker = json.loads((two_versions["store"] / "fracfeat-store.json").read_text())
    assert marker == {"format": "fracfeat-store", "format_version": 2,
                      "fracfeat_version": __import__("fracfeat").__version__}


def test_missing_store(tmp_path):
    store = FeatureStore(tmp_path / "nowhere")
    assert store.versions() == []
    with pytest.raises(StoreError, match="no feature store at .*run extract"):
        store.open()


def test_store_location_that_is_not_a_store(tmp_path, real_images):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        extract(real_images["fractured"][:1], store=tmp_path / "file", **TINY)
    (tmp_path / "mydir").mkdir()
    (tmp_path / "mydir" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a fracfeat store"):
        extract(real_images["fractured"][:1], store=tmp_path / "mydir", **TINY)
    with pytest.raises(StoreError, match="not a fracfeat store"):
        FeatureStore(tmp_path / "mydir").open()
    assert (tmp_path / "mydir" / "notes.txt").read_text() == "mine"


def test_diff_with_exact_duplicates_counts_each_row(tmp_path, real_images):
    """FracAtlas holds byte-identical copies: dropping one copy is a removal, not a move or nothing."""
    img = tmp_path / "img"
    img.mkdir()
    shutil.copy(real_images["fractured"][0], img / "a.jpg")
    shutil.copy(real_images["fractured"][0], img / "a_copy.jpg")
    shutil.copy(real_images["fractured"][1], img / "b.jpg")
    shutil.copy(real_images["fractured"][1], img / "b_copy.jpg")
    store = tmp_path / "store"
    extract([img / "a.jpg", img / "a_copy.jpg", img / "b.jpg"], store=store, **TINY)
    extract([img / "a.jpg", img / "b.jpg", img / "b_copy.jpg"], store=store, **TINY)
    d = FeatureStore(store).diff(1, 2)
    assert d.removed == [str(img / "a_copy.jpg")]
    assert d.added == [str(img / "b_copy.jpg")]
    assert d.moved == [] and d.relabeled == []


def test_writes_go_through_a_writer_that_lives_only_inside_its_block(tmp_path):
    """FeatureStore only reads; its writer holds the lock, makes the layout, and refuses to write once left."""
    from fracfeat._store import StoreWriter

    store = FeatureStore(tmp_path / "store")
    assert not any(hasattr(store, name) for name in ("write_lock", "create", "commit", "write_checkpoint"))
    (tmp_path / "store" / "tmp").mkdir(parents=True)
    (tmp_path / "store" / "tmp" / "leftover.h5").write_text("killed writer")
    with store.writer() as w:
        assert store.exists() and list((store.root / "tmp").iterdir()) == []
        assert w.latest_with_fingerprint("f" * 64) == 0 and w.find_identical("f" * 64, "c" * 64) is None
    with pytest.raises(StoreError, match=r"StoreWriter.remove_checkpoints .* outside its `with store.writer\(\)"):
        w.remove_checkpoints("f" * 64, set())
    with pytest.raises(TypeError, match="only from `with store.writer"):
        StoreWriter(store, None)
