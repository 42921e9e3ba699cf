"""extract(): every source kind into a real store, row order, determinism, and the content-hash cache."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from fracfeat import FeatureStore, extract
from fracfeat._sources import load_records

from conftest import TINY


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture()
def images(real_images) -> list[Path]:
    """Eight real radiographs, 4 fractured then 4 not."""
    return real_images["fractured"][:4] + real_images["not_fractured"][:4]


def test_class_folder(class_folder, tmp_path):
    fs = extract(class_folder, store=tmp_path / "store", **TINY)

    records, _ = load_records(class_folder)
    assert fs.X.shape == (12, 512) and fs.X.dtype == np.float32
    assert list(fs.paths) == [str(Path(r.path).resolve()) for r in records]
    assert list(fs.ids) == [sha256(r.path) for r in records]
    assert list(fs.y) == [r.label for r in records]
    assert list(fs.class_names) == [r.class_name for r in records]
    assert sorted(set(fs.y)) == [0, 1]
    assert fs.classes == ("not_fractured", "fractured")
    assert fs.version == 1
    assert fs.provenance["source"] == f"folder:{class_folder.resolve()}"
    assert fs.failures == []
    assert np.isfinite(fs.X).all() and fs.X.std() > 0


def test_split_folders_keep_splits(tmp_path, real_images):
    root = tmp_path / "BoneFracture"
    for split, k in (("train", slice(0, 2)), ("val", slice(2, 3)), ("test", slice(3, 4))):
        for label, folder in (("fractured", "fractured"), ("not_fractured", "Non_fractured")):
            (root / split / folder).mkdir(parents=True)
            for p in real_images[label][k]:
                shutil.copy(p, root / split / folder / p.name)

    fs = extract(root, store=tmp_path / "store", **TINY)

    assert len(fs) == 8
    by_name = {Path(p).name: (s, int(y)) for p, s, y in zip(fs.paths, fs.splits, fs.y)}
    assert by_name[real_images["fractured"][0].name] == ("train", 1)
    assert by_name[real_images["not_fractured"][2].name] == ("val", 0)
    assert by_name[real_images["not_fractured"][3].name] == ("test", 0)
    assert fs.split_names == ["train", "val", "test"]
    assert fs.classes == ("Non_fractured", "fractured")
    assert len(fs.split("train")) == 4


def test_csv_manifest_with_groups(tmp_path, images):
    manifest = tmp_path / "data" / "manifest.csv"
    (tmp_path / "data" / "img").mkdir(parents=True)
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "split"])
        for k, p in enumerate(images):
            shutil.copy(p, tmp_path / "data" / "img" / p.name)
            w.writerow([f"img/{p.name}", "fractured" if k < 4 else "not_fractured", f"g{k // 2}", "train"])

    fs = extract(manifest, store=tmp_path / "store", **TINY)

    assert [Path(p).name for p in fs.paths] == [p.name for p in images]
    assert list(fs.y) == [1] * 4 + [0] * 4
    assert list(fs.groups) == ["g0", "g0", "g1", "g1", "g2", "g2", "g3", "g3"]
    assert fs.has_groups
    assert set(fs.splits) == {"train"}


def test_real_fracatlas_manifest_rows(fracatlas, tmp_path):
    """A slice of the shared manifest, extracted straight from ../shared (no copies)."""
    rows = list(csv.DictReader(open(fracatlas / "manifest.csv")))
    used = [r for r in rows if r["use"] == "1"]
    picked = [r for r in used if r["label"] != "fractured"][:3] + [r for r in used if r["label"] == "fractured"][:3]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in picked:
            w.writerow({**r, "path": str(fracatlas / r["path"])})
    fs = extract(manifest, store=tmp_path / "store", **TINY)
    assert list(fs.ids) == [sha256(fracatlas / r["path"]) for r in picked]
    assert [hashlib.md5((fracatlas / r["path"]).read_bytes()).hexdigest() for r in picked] == [r["md5"] for r in picked]
    assert list(fs.groups) == [r["group"] for r in picked]
    assert list(fs.y) == [1 if r["label"] == "fractured" else 0 for r in picked]


def test_list_of_paths_is_unlabeled(tmp_path, images):
    fs = extract(images[:3], store=tmp_path / "store", **TINY)
    assert fs.y is None
    assert list(fs.paths) == [str(p.resolve()) for p in images[:3]]
    assert fs.provenance["source"] == "paths:3 files"


def test_rows_follow_source_order_with_duplicates(tmp_path, images):
    order = [images[5], images[0], images[7], images[0], images[2]]  # images[0] twice
    fs = extract(order, store=tmp_path / "store", batch_size=2, **TINY)

    assert list(fs.ids) == [sha256(p) for p in order]
    assert np.array_equal(fs.X[1], fs.X[3])
    assert fs.provenance["n_computed"] == 4  # one computation per distinct content

    # Each row belongs to its own image: the reverse order, in batches made up differently, in a
    # fresh store, gives the same rows reversed.
    backwards = extract(order[::-1], store=tmp_path / "backwards", batch_size=3, **TINY)
    assert backwards.provenance["n_computed"] == 4
    np.testing.assert_allclose(backwards.X, fs.X[::-1], rtol=1e-5, atol=1e-5)


def test_deterministic_across_stores(tmp_path, images):
    a = extract(images, store=tmp_path / "a", batch_size=3, **TINY)
    b = extract(images, store=tmp_path / "b", batch_size=3, **TINY)
    assert np.array_equal(a.X, b.X)
    assert list(a.ids) == list(b.ids)
    assert a.fingerprint == b.fingerprint


def test_second_run_computes_nothing_and_returns_the_same_version(tmp_path, images):
    store = tmp_path / "store"
    first = extract(images, store=store, **TINY)
    second = extract(images, store=store, **TINY)

    assert first.provenance["n_computed"] == 8
    assert second.provenance["n_computed"] == 0
    assert second.provenance["n_reused"] == 8
    assert second.version == first.version == 1
    assert [v.version for v in FeatureStore(store).versions()] == [1]
    assert np.array_equal(first.X, second.X)
    # The stored version itself is unchanged: it still says how its rows were made.
    assert FeatureStore(store).provenance(1)["n_computed"] == 8


def test_adding_images_computes_only_those(tmp_path, images):
    store = tmp_path / "store"
    first = extract(images[:5], store=store, **TINY)
    grown = extract(images, store=store, **TINY)

    assert grown.provenance["n_computed"] == 3
    assert grown.provenance["n_reused"] == 5
    assert grown.version == 2 and grown.provenance["parent"] == 1
    assert np.array_equal(grown.X[:5], first.X)
    assert list(grown.ids) == [sha256(p) for p in images]

    # Removing images computes nothing either.
    shrunk = extract(images[2:], store=store, **TINY)
    assert shrunk.provenance["n_computed"] == 0 and shrunk.version == 3
    assert np.array_equal(shrunk.X, grown.X[2:])


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, real_images) -> tuple[Path, list[Path]]:
    """A store holding 4 images extracted with TINY, copied by each test that writes to it."""
    root = tmp_path_factory.mktemp("base")
    imgs = real_images["fractured"][:2] + real_images["not_fractured"][:2]
    extract(imgs, store=root / "store", **TINY)
    return root / "store", imgs


@pytest.mark.parametrize(
    "change",
    [
        dict(backbone="resnet50"),
        dict(image_size=64),
        dict(pooling="max"),
        dict(weights="vgg16_weights"),
        dict(precision="the other one"),
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_changed_setting_never_reuses_rows(base_store, tmp_path, change, request):
    src, imgs = base_store
    store = tmp_path / "store"
    shutil.copytree(src, store)
    if change.get("weights") == "vgg16_weights":
        change = dict(weights=str(request.getfixturevalue("vgg16_weights")))
    if change.get("precision") == "the other one":
        # "auto" is bfloat16 on a CPU with AVX512-BF16/AMX and float32 elsewhere: read it, never assume it.
        resolved = FeatureStore(src).open(1).provenance["precision"]
        change = dict(precision="float32" if resolved == "bfloat16" else "bfloat16")
    settings = {**TINY, **change}

    before = FeatureStore(store).open(1)
    fs = extract(imgs, store=store, **settings)

    assert fs.provenance["n_computed"] == 4 and fs.provenance["n_reused"] == 0
    assert fs.version == 2 and fs.provenance["parent"] == 0  # derives from no version of another extractor
    assert fs.fingerprint != before.fingerprint
    key = next(iter(change))
    assert fs.provenance[key] != before.provenance[key]
    # ... and the original setting still finds its own rows.
    again = extract(imgs, store=store, **TINY)
    assert again.provenance["n_computed"] == 0 and again.version == 1


def test_weights_identity_in_provenance(tmp_path, images, vgg16_weights):
    fs = extract(images[:2], store=tmp_path / "store", **{**TINY, "weights": vgg16_weights})
    assert fs.provenance["weights"] == "file:sha256:a2f51117308129c3de9a523c91d35160eb75a6a9e5db1e2afb4f48e48dfb733a"
    assert fs.provenance["weights_path"] == str(vgg16_weights.resolve())


def test_bad_settings_fail_before_any_work(tmp_path, images):
    from fracfeat import ConfigError

    for bad in (dict(batch_size=0), dict(pooling="mean"), dict(image_size=8), dict(precision="int4"),
                dict(backbone="alexnet")):
        with pytest.raises(ConfigError):
            extract(images[:1], store=tmp_path / "store", **{**TINY, **bad})
    assert not (tmp_path / "store").exists()


def test_png_and_jpeg_in_one_source(tmp_path, real_images):
    """Radiographs saved as 8-bit and 16-bit grayscale PNG extract beside the original JPEGs."""
    from PIL import Image

    root = tmp_path / "dataset"
    (root / "fractured").mkdir(parents=True)
    (root / "not_fractured").mkdir()
    jpeg = real_images["fractured"][0]
    shutil.copy(jpeg, root / "fractured" / "a.jpg")
    with Image.open(jpeg) as img:
        gray = np.asarray(img.convert("L"))
    Image.fromarray(gray).save(root / "fractured" / "b.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "not_fractured" / "c16.png")

    fs = extract(root, store=tmp_path / "store", **TINY)

    assert fs.failures == []
    assert [Path(p).name for p in fs.paths] == ["a.jpg", "b.png", "c16.png"]
    assert list(fs.y) == [1, 1, 0]
    # The same pixels as 8-bit or as 16-bit PNG give the same features.
    np.testing.assert_allclose(fs.X[1], fs.X[2], rtol=1e-5, atol=1e-5)
