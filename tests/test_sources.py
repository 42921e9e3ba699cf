"""Sources -> image records: class folders, split folders, CSV manifests, path lists.

Pure Python (no Keras): every test here runs in milliseconds on real radiograph files.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fracfeat import SourceError
from fracfeat._sources import FRACTURED, NOT_FRACTURED, UNLABELED, load_records

from conftest import manifest_rows


def _copy(paths, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        shutil.copy(p, folder / p.name)
        out.append(folder / p.name)
    return out


@pytest.mark.parametrize(
    "positive, negative",
    [
        ("fractured", "not fractured"),
        ("fractured", "not_fractured"),
        ("fractured", "non-fractured"),
        ("Fractured", "Non_fractured"),
    ],
)
def test_class_folder_name_variants_map_to_labels_and_keep_names(tmp_path, real_images, positive, negative):
    root = tmp_path / "dataset"
    pos = _copy(real_images["fractured"][:2], root / positive)
    neg = _copy(real_images["not_fractured"][:3], root / negative)

    records, description = load_records(root)

    by_path = {r.path: r for r in records}
    assert set(by_path) == {str(p) for p in pos + neg}
    for p in pos:
        assert (by_path[str(p)].label, by_path[str(p)].class_name) == (FRACTURED, positive)
    for p in neg:
        assert (by_path[str(p)].label, by_path[str(p)].class_name) == (NOT_FRACTURED, negative)
    assert all(r.split == "" and r.group == "" for r in records)
    assert description == f"folder:{root.resolve()}"


def test_class_folder_order_is_deterministic_and_sorted(class_folder):
    first = load_records(class_folder)[0]
    second = load_records(class_folder)[0]
    assert first == second
    paths = [r.path for r in first]
    assert paths == sorted(paths)


@pytest.mark.parametrize("name", ["maybe", "fracture_suspected", "unknown", "other"])
def test_ambiguous_class_folder_is_refused_with_the_fix(tmp_path, real_images, name):
    root = tmp_path / "dataset"
    _copy(real_images["fractured"][:1], root / "fractured")
    _copy(real_images["not_fractured"][:1], root / name)
    with pytest.raises(SourceError) as err:
        load_records(root)
    message = str(err.value)
    assert repr(name) in message
    assert "class_map" in message


def test_class_map_resolves_unknown_names(tmp_path, real_images):
    root = tmp_path / "dataset"
    _copy(real_images["fractured"][:2], root / "broken")
    _copy(real_images["not_fractured"][:2], root / "intact")
    records, _ = load_records(root, class_map={"broken": 1, "intact": 0})
    assert Counter((r.class_name, r.label) for r in records) == {("broken", 1): 2, ("intact", 0): 2}


def test_class_map_rejects_labels_other_than_0_and_1(tmp_path, real_images):
    root = tmp_path / "dataset"
    _copy(real_images["fractured"][:1], root / "broken")
    with pytest.raises(SourceError, match="must be 1"):
        load_records(root, class_map={"broken": 2})


def test_split_folders_keep_each_images_split(tmp_path, real_images):
    root = tmp_path / "BoneFracture"
    expected = {}
    for split, k in (("train", slice(0, 2)), ("val", slice(2, 3)), ("test", slice(3, 5))):
        for label, folder in (("fractured", "fractured"), ("not_fractured", "not_fractured")):
            for p in _copy(real_images[label][k], root / split / folder):
                expected[str(p)] = (split, FRACTURED if label == "fractured" else NOT_FRACTURED)

    records, _ = load_records(root)

    assert {r.path: (r.split, r.label) for r in records} == expected
    assert Counter(r.split for r in records) == {"train": 4, "val": 2, "test": 4}


def test_split_folder_spellings_are_normalised(tmp_path, real_images):
    root = tmp_path / "data"
    _copy(real_images["fractured"][:1], root / "Training" / "fractured")
    _copy(real_images["fractured"][1:2], root / "valid" / "fractured")
    _copy(real_images["fractured"][2:3], root / "testing" / "fractured")
    assert sorted(r.split for r in load_records(root)[0]) == ["test", "train", "val"]


def test_split_folders_mixed_with_class_folders_are_refused(tmp_path, real_images):
    root = tmp_path / "data"
    _copy(real_images["fractured"][:1], root / "train" / "fractured")
    _copy(real_images["fractured"][1:2], root / "fractured")
    with pytest.raises(SourceError, match="mixes split folders"):
        load_records(root)


def test_folder_of_images_only_is_unlabeled(tmp_path, real_images):
    paths = _copy(real_images["fractured"][:3], tmp_path / "incoming")
    records, _ = load_records(tmp_path / "incoming")
    assert [r.path for r in records] == sorted(str(p) for p in paths)
    assert {r.label for r in records} == {UNLABELED}


def test_real_fracatlas_manifest(fracatlas):
    """The shared manifest.csv: paths resolve against its folder, labels and groups come through."""
    rows = manifest_rows()
    records, description = load_records(fracatlas / "manifest.csv")

    assert description == f"csv:{(fracatlas / 'manifest.csv').resolve()}"
    assert len(records) == len(rows) == 4083
    assert Counter(r.label for r in records) == {NOT_FRACTURED: 3366, FRACTURED: 717}
    for rec, row in zip(records, rows):  # manifest order is kept
        assert rec.path == str(fracatlas / row["path"])
        assert rec.group == row["group"]
        assert rec.class_name == row["label"]
        assert rec.split == ""
    # Spot-check that the resolved paths are real files (not all 4,083: that is the extractor's job).
    for rec in records[::500]:
        assert Path(rec.path).is_file()


def test_csv_relative_paths_resolve_against_the_csv_folder(tmp_path, real_images, monkeypatch):
    project = tmp_path / "project"
    pos = _copy(real_images["fractured"][:2], project / "imgs" / "a")
    neg = _copy(real_images["not_fractured"][:2], project / "imgs" / "b")
    manifest = project / "meta" / "labels.csv"
    manifest.parent.mkdir()
    rows = [
        {"Image_Path": f"../imgs/a/{pos[0].name}", "Label": "fractured", "Split": "train", "Patient_ID": "p1"},
        {"Image_Path": f"../imgs/b/{neg[0].name}", "Label": "0", "Split": "Validation", "Patient_ID": "p1"},
        {"Image_Path": str(pos[1]), "Label": "1", "Split": "test", "Patient_ID": "p2"},  # absolute path
        {"Image_Path": f"../imgs/b/{neg[1].name}", "Label": "Non_fractured", "Split": "", "Patient_ID": ""},
    ]
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory

    records, _ = load_records(manifest)

    assert [Path(r.path).resolve() for r in records] == [pos[0], neg[0], pos[1], neg[1]]
    assert all(Path(r.path).is_file() for r in records)
    assert [r.label for r in records] == [1, 0, 1, 0]
    assert [r.class_name for r in records] == ["fractured", "0", "1", "Non_fractured"]
    assert [r.split for r in records] == ["train", "val", "test", ""]
    assert [r.group for r in records] == ["p1", "p1", "p2", ""]


def test_csv_without_label_column_is_unlabeled(tmp_path, real_images):
    paths = _copy(real_images["fractured"][:2], tmp_path / "imgs")
    manifest = tmp_path / "m.csv"
    manifest.write_text("filename\n" + "".join(f"imgs/{p.name}\n" for p in paths))
    records, _ = load_records(manifest)
    assert [r.path for r in records] == [str(p) for p in paths]
    assert {r.label for r in records} == {UNLABELED}


def test_csv_without_path_column_names_the_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("picture,label\na.jpg,fractured\n")
    with pytest.raises(SourceError, match="no path column") as err:
        load_records(manifest)
    assert "picture" in str(err.value)


def test_csv_ambiguous_label_names_the_line(tmp_path, real_images):
    paths = _copy(real_images["fractured"][:2], tmp_path / "imgs")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\nimgs/{paths[0].name},fractured\nimgs/{paths[1].name},suspicious\n")
    with pytest.raises(SourceError, match=r"line 3: .*'suspicious'"):
        load_records(manifest)


def test_list_of_paths_is_unlabeled_and_keeps_order(real_images):
    paths = real_images["not_fractured"][:3] + real_images["fractured"][:2]
    paths = paths[::-1]
    records, description = load_records(paths)
    assert [r.path for r in records] == [str(p) for p in paths]
    assert {r.label for r in records} == {UNLABELED}
    assert description == "paths:5 files"


def test_list_of_paths_with_labels_groups_splits(real_images):
    paths = real_images["fractured"][:2] + real_images["not_fractured"][:1]
    records, _ = load_records(paths, labels=[1, "not fractured", None], groups=["a", "a", "b"],
                              splits=["train", "test", "val"])
    assert [(r.label, r.group, r.split) for r in records] == [(1, "a", "train"), (0, "a", "test"), (-1, "b", "val")]


def test_list_metadata_of_the_wrong_length_is_refused(real_images):
    with pytest.raises(SourceError, match="labels has 1 entries but there are 2 paths"):
        load_records(real_images["fractured"][:2], labels=[1])


@pytest.mark.parametrize(
    "source, match",
    [
        ("/nonexistent/folder", "does not exist"),
        (42, "not int"),
        ([1, 2], "must hold image paths"),
    ],
)
def test_bad_sources_say_what_to_pass(source, match):
    with pytest.raises(SourceError, match=match):
        load_records(source)


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        load_records(tmp_path / "empty")


@pytest.mark.parametrize("where", ["root", "split"])
def test_images_beside_class_folders_are_refused_not_dropped(tmp_path, real_images, where):
    """An image next to the class folders has no label; silently skipping it would lose data."""
    root = tmp_path / "dataset"
    base = root / "train" if where == "split" else root
    _copy(real_images["fractured"][:1], base / "fractured")
    _copy(real_images["not_fractured"][:1], base / "not_fractured")
    stray = _copy(real_images["fractured"][1:2], base)[0]
    with pytest.raises(SourceError, match=f"{stray.name}.*class folder") as err:
        load_records(root)
    assert str(base) in str(err.value)


# -- label and leakage hygiene (issue 19, items 8 and 9) --------------------------------------------

def test_an_exact_duplicate_csv_row_is_dropped_with_a_warning(tmp_path, real_images, caplog):
    pos = _copy(real_images["fractured"][:2], tmp_path / "imgs")
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label,group\nimgs/{pos[0].name},fractured,a\nimgs/{pos[1].name},fractured,b\n"
                        f"imgs/{pos[0].name},fractured,a\n")
    with caplog.at_level("WARNING", logger="fracfeat"):
        records, _ = load_records(manifest)
    assert [Path(r.path).name for r in records] == [pos[0].name, pos[1].name]
    assert any("1 exact duplicate row" in r.getMessage() and "line 4" in r.getMessage() for r in caplog.records)


def _dicom_bytes() -> bytes:
    return b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 64


def test_every_file_of_a_folder_becomes_a_row_a_failure_or_a_logged_skip(tmp_path, real_images, caplog):
    from PIL import Image

    root = tmp_path / "dataset"
    fractured, normal = root / "fractured", root / "not_fractured"
    _copy(real_images["fractured"][:1], fractured)
    _copy(real_images["not_fractured"][:1], normal)
    with Image.open(real_images["fractured"][1]) as img:
        img.convert("L").resize((64, 64)).save(fractured / "a.gif")
    shutil.copy(real_images["fractured"][2], fractured / "b.jfif")
    shutil.copy(real_images["not_fractured"][1], normal / "c.jpe")
    (fractured / "scan.dcm").write_bytes(_dicom_bytes())
    (normal / "IM000001").write_bytes(_dicom_bytes())  # DICOM without a suffix: known by its preamble
    (normal / "notes.txt").write_text("seen by Dr. X")
    (normal / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with caplog.at_level("INFO", logger="fracfeat"):
        records, _ = load_records(root)
    names = {Path(r.path).name: r for r in records}
    assert set(names) == {real_images["fractured"][0].name, real_images["not_fractured"][0].name,
                          "a.gif", "b.jfif", "c.jpe", "scan.dcm", "IM000001"}
    assert names["a.gif"].label == FRACTURED and names["c.jpe"].label == NOT_FRACTURED
    # DICOM files (with a suffix, or known by their preamble) are records like the others: decoding them
    # later makes these fake ones "damaged DICOM" rows (tests/test_dicom.py reads real ones)
    assert not names["scan.dcm"].failure and not names["IM000001"].failure
    assert not names["a.gif"].failure
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "2 files" in skipped[0] and "notes.txt" in skipped[0] and ".DS_Store" in skipped[0]


def test_every_image_suffix_is_one_pillow_opens():
    from PIL import Image

    from fracfeat._sources import IMAGE_SUFFIXES

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    assert IMAGE_SUFFIXES <= readable, sorted(IMAGE_SUFFIXES - readable)
