"""What a user points at -> image records.

A *source* is one of:

- a folder with one subfolder per class (``dataset/fractured``, ``dataset/not_fractured``);
- a folder with split subfolders holding class subfolders (``data/{train,val,test}/{fractured,...}``);
- a folder holding only images (unlabeled);
- a CSV manifest with a path column and optional label, split and group columns;
- a list of image paths (unlabeled unless ``labels=`` is given).

Every source becomes a list of :class:`ImageRecord` in a deterministic order.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ._errors import SourceError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

FRACTURED = 1
NOT_FRACTURED = 0
UNLABELED = -1

# Normalised class names (lower case, separators collapsed to one space) that mean each label.
# Anything else is refused: guessing a label silently corrupts every metric downstream.
_POSITIVE_NAMES = frozenset({"fractured", "fracture", "fractures", "positive", "abnormal", "1"})
_NEGATIVE_NAMES = frozenset(
    {
        "not fractured", "non fractured", "nonfractured", "notfractured", "unfractured",
        "no fracture", "not fracture", "non fracture", "normal", "negative", "0",
    }
)

_SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}

_PATH_COLUMNS = ("path", "filepath", "file_path", "image_path", "image", "filename", "file")
_LABEL_COLUMNS = ("label", "class", "class_name", "target", "fractured")
_SPLIT_COLUMNS = ("split", "subset", "fold_split")
_GROUP_COLUMNS = ("group", "group_id", "patient", "patient_id")


@dataclass(frozen=True)
class ImageRecord:
    """One image as the source describes it (before its bytes are read)."""

    path: str
    label: int = UNLABELED
    class_name: str = ""
    split: str = ""
    group: str = ""


def normalize_class_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower()).strip()


def label_for_class_name(name: str, class_map: Mapping[str, int] | None = None) -> int:
    """Map a class folder/column value to 1 (fractured) or 0 (not fractured), or raise."""
    if class_map is not None:
        if name in class_map:
            return _checked_label(class_map[name], name)
        norm = {normalize_class_name(k): v for k, v in class_map.items()}
        if normalize_class_name(name) in norm:
            return _checked_label(norm[normalize_class_name(name)], name)
    key = normalize_class_name(name)
    if key in _POSITIVE_NAMES:
        return FRACTURED
    if key in _NEGATIVE_NAMES:
        return NOT_FRACTURED
    raise SourceError(
        f"cannot tell whether class {name!r} means fractured or not fractured. "
        f"Rename it (e.g. 'fractured' / 'not_fractured') or pass "
        f"class_map={{{name!r}: 1 or 0, ...}} to say which."
    )


def _checked_label(value, name) -> int:
    if value not in (0, 1):
        raise SourceError(f"class_map[{name!r}] = {value!r}: labels must be 1 (fractured) or 0 (not fractured)")
    return int(value)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted for a deterministic order."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            p = Path(root) / f
            if is_image_file(p):
                found.append(p)
    return sorted(found, key=lambda p: p.as_posix())


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _refuse_loose_images(folder: Path) -> None:
    """Images next to class (or split) folders have no label: refuse them rather than drop them."""
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if loose:
        shown = ", ".join(loose[:5]) + (f" and {len(loose) - 5} more" if len(loose) > 5 else "")
        raise SourceError(
            f"{folder}: {len(loose)} image(s) lie beside the class folders ({shown}), so their label is unknown. "
            f"Move each into its class folder, or pass a list of paths or a CSV manifest instead."
        )


def _class_folders(folder: Path, split: str, class_map) -> list[ImageRecord]:
    _refuse_loose_images(folder)
    records = []
    for class_dir in _subdirs(folder):
        label = label_for_class_name(class_dir.name, class_map)
        for p in _images_in(class_dir):
            records.append(ImageRecord(str(p), label, class_dir.name, split, ""))
    return records


def records_from_folder(folder: Path, class_map=None) -> list[ImageRecord]:
    subdirs = _subdirs(folder)
    if not subdirs:
        return [ImageRecord(str(p)) for p in _images_in(folder)]
    split_dirs = [d for d in subdirs if d.name.lower() in _SPLIT_NAMES]
    if split_dirs:
        others = [d.name for d in subdirs if d not in split_dirs]
        if others:
            raise SourceError(
                f"{folder}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"folders ({', '.join(others)}). Put every class folder inside a split folder, or remove the split folders."
            )
        _refuse_loose_images(folder)
        records = []
        for d in split_dirs:
            records.extend(_class_folders(d, _SPLIT_NAMES[d.name.lower()], class_map))
        return records
    return _class_folders(folder, "", class_map)


def _pick_column(fieldnames: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {f.strip().lower(): f for f in fieldnames}
    for c in candidates:
        if c in lowered:
            return lowered[c]
    return None


def _label_from_value(value: str, class_map) -> tuple[int, str]:
    value = value.strip()
    if value == "":
        return UNLABELED, ""
    return label_for_class_name(value, class_map), value


def records_from_csv(csv_path: Path, class_map=None) -> list[ImageRecord]:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        path_col = _pick_column(fields, _PATH_COLUMNS)
        if path_col is None:
            raise SourceError(
                f"{csv_path}: no path column. Found columns {fields}; name the column of image paths "
                f"one of {list(_PATH_COLUMNS)}."
            )
        label_col = _pick_column(fields, _LABEL_COLUMNS)
        split_col = _pick_column(fields, _SPLIT_COLUMNS)
        group_col = _pick_column(fields, _GROUP_COLUMNS)
        base = csv_path.parent
        records = []
        for lineno, row in enumerate(reader, start=2):
            raw = (row.get(path_col) or "").strip()
            if not raw:
                raise SourceError(f"{csv_path}, line {lineno}: empty {path_col!r}")
            p = Path(raw)
            if not p.is_absolute():
                p = base / p
            try:
                label, name = _label_from_value(row.get(label_col) or "", class_map) if label_col else (UNLABELED, "")
            except SourceError as e:
                raise SourceError(f"{csv_path}, line {lineno}: {e}") from None
            split = (row.get(split_col) or "").strip() if split_col else ""
            split = _SPLIT_NAMES.get(split.lower(), split)
            group = (row.get(group_col) or "").strip() if group_col else ""
            records.append(ImageRecord(str(p), label, name, split, group))
    return records


def records_from_paths(
    paths: Iterable[os.PathLike | str],
    labels: Sequence | None = None,
    groups: Sequence | None = None,
    splits: Sequence | None = None,
    class_map=None,
) -> list[ImageRecord]:
    paths = [str(p) for p in paths]
    n = len(paths)
    for name, seq in (("labels", labels), ("groups", groups), ("splits", splits)):
        if seq is not None and len(seq) != n:
            raise SourceError(f"{name} has {len(seq)} entries but there are {n} paths; give one per path")
    records = []
    for i, p in enumerate(paths):
        label, name = UNLABELED, ""
        if labels is not None:
            v = labels[i]
            if isinstance(v, str):
                label, name = _label_from_value(v, class_map)
            elif v is None:
                label = UNLABELED
            else:
                label = int(v)
                if label not in (0, 1, UNLABELED):
                    raise SourceError(f"labels[{i}] = {v!r}: use 1 (fractured), 0 (not fractured) or -1 (unlabeled)")
                name = {1: "fractured", 0: "not_fractured"}.get(label, "")
        group = "" if groups is None else str(groups[i])
        split = "" if splits is None else _SPLIT_NAMES.get(str(splits[i]).lower(), str(splits[i]))
        records.append(ImageRecord(p, label, name, split, group))
    return records


def load_records(source, *, labels=None, groups=None, splits=None, class_map=None) -> tuple[list[ImageRecord], str]:
    """Resolve ``source`` to records and a one-line description of it (kept in provenance)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise SourceError(f"source {str(source)!r} does not exist: pass a folder of images, a CSV manifest, or a list of image paths")
        if any(v is not None for v in (labels, groups, splits)):
            raise SourceError("labels=, groups= and splits= apply only when the source is a list of paths")
        if path.is_dir():
            records, kind = records_from_folder(path, class_map), "folder"
        elif path.suffix.lower() == ".csv":
            records, kind = records_from_csv(path, class_map), "csv"
        elif is_image_file(path):
            records, kind = [ImageRecord(str(path))], "image"
        else:
            raise SourceError(f"source {str(source)!r} is neither a folder, a .csv manifest nor an image file")
        description = f"{kind}:{path.resolve()}"
    else:
        try:
            items = list(source)
        except TypeError:
            raise SourceError(f"source must be a folder, a CSV file or a list of image paths, not {type(source).__name__}") from None
        if items and not all(isinstance(p, (str, os.PathLike)) for p in items):
            raise SourceError("a list source must hold image paths (str or pathlib.Path)")
        records = records_from_paths(items, labels, groups, splits, class_map)
        description = f"paths:{len(records)} files"
    if not records:
        raise SourceError(f"source {source if isinstance(source, (str, os.PathLike)) else 'list'} holds no images "
                          f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return records, description
