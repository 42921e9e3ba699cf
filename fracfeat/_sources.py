"""What a user points at -> image records.

A *source* is one of:

- a folder with one subfolder per class (``dataset/fractured``, ``dataset/not_fractured``);
- a folder with split subfolders holding class subfolders (``data/{train,val,test}/{fractured,...}``);
- a folder holding only images (unlabeled);
- a CSV manifest with a path column and optional label, split and group columns;
- a list of image paths (unlabeled unless ``labels=`` is given);
- a DICOMDIR (a DICOM media directory), or a folder holding one beside folders that are not classes:
  the image files it lists, unlabeled;
- a mapping ``{source name: any of the above}``: several sources (hospitals, datasets) together, each
  record tagged with its source's name.

Every source becomes a list of :class:`ImageRecord` in a deterministic order. Every file a folder holds
becomes a record, a record that fails (DICOM without pydicom installed), or one logged line of skipped
files. DICOM files (``.dcm``, or any file without an image suffix that opens with the ``DICM``
preamble) are records like images; their header fills what the source leaves empty: ``group`` (a
salted hash of PatientID), ``source`` (InstitutionName, else Manufacturer), ``region``
(BodyPartExamined) and ``projection`` (ViewPosition). docs/dicom.md says what is read and what is kept.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ._dicom import DICOM_MAGIC_AT, DICOM_SUFFIXES, DICOMDIR_NAME, dicomdir_paths, has_dicom_magic, header_fields
from ._errors import ConfigError, MissingDependencyError, SourceError
from ._views import check_view

# Suffixes of the formats Pillow reads (tests/test_sources.py checks each against Pillow's registry); a
# GIF gives its first frame.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif",
                            ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"})
# The failure reason of a DICOM file where pydicom is not installed.
DICOM_REASON = "missing dependency: pydicom is needed to read DICOM files: pip install 'fracfeat[dicom]'"

log = logging.getLogger("fracfeat")

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
# What a source may say of each image beyond its label, split and group: the ImageRecord field of each, in the
# order their store row datasets (the name + "s": "sources", ...) were added. Everything downstream (the store,
# FeatureSet, evaluate's subgroups) reads this tuple: a new field is a name here and its CSV columns below.
ROW_METADATA = ("source", "region", "projection")
# The CSV columns each is read from, the first present wins. FracAtlas's ``view`` column holds projections
# (frontal, lateral, oblique); it is never fracfeat's augmented ``view=`` setting, and a cell that names one
# (hflip, rot+10...) is refused.
_METADATA_COLUMNS = {
    "source": ("source", "site", "hospital", "institution"),
    "region": ("region", "body_part", "bodypart"),
    "projection": ("projection", "view_position", "viewposition", "view"),
}


@dataclass(frozen=True)
class ImageRecord:
    """One image as the source describes it (before its bytes are read).

    ``source`` names where it comes from (a hospital, a dataset: a CSV ``source`` column or the key of a
    mapping of sources), ``region`` the body region (a CSV ``region`` column), ``projection`` the
    radiographic projection (AP, PA, LAT...: a CSV ``projection`` or ``view`` column, DICOM ViewPosition);
    "" when unknown. :data:`ROW_METADATA` names these fields.
    ``failure`` is set when the file is known to be unusable before it is read (DICOM without pydicom):
    it becomes a failure row of the version with that reason.
    """

    path: str
    label: int = UNLABELED
    class_name: str = ""
    split: str = ""
    group: str = ""
    source: str = ""
    region: str = ""
    failure: str = ""
    projection: str = ""


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


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` (``.dicom``) file, or a file without an image suffix that opens with the DICOM preamble.

    A DICOMDIR (an index, no pixels) is not: as a source it stands for the files it lists.
    """
    if path.name.startswith(".") or path.name.upper() == DICOMDIR_NAME:
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_AT + 4)
    except OSError:
        return False
    return has_dicom_magic(head)


def _record(path, label=UNLABELED, class_name="", split="", group="", **metadata) -> ImageRecord:
    """A record of ``path`` (``metadata``: :data:`ROW_METADATA` values); a DICOM file's header fills the group
    and metadata the source left empty."""
    if not is_dicom_file(Path(path)):
        return ImageRecord(str(path), label, class_name, split, group, **metadata)
    try:
        header = header_fields(str(path))
    except MissingDependencyError:
        return ImageRecord(str(path), label, class_name, split, group, **metadata, failure=DICOM_REASON)
    filled = {name: metadata.get(name) or header.get(name, "") for name in ROW_METADATA}
    return ImageRecord(str(path), label, class_name, split, group or header.get("group", ""), **filled)


class _Skipped:
    """Files a folder source leaves out (neither images nor DICOM), logged once per source."""

    def __init__(self):
        self.names: list[str] = []

    def log(self, folder: Path) -> None:
        if self.names:
            shown = ", ".join(self.names[:5]) + (f" and {len(self.names) - 5} more" if len(self.names) > 5 else "")
            log.info("%s: skipped %d files that are not images (%s)", folder, len(self.names), shown)


def _images_in(folder: Path, skipped: _Skipped | None = None) -> list[Path]:
    """Image (and DICOM) files below ``folder`` (recursively), sorted; the other files' names go to ``skipped``."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        if skipped is not None:
            skipped.names.extend(f"{d}/" for d in sorted(dirs) if d.startswith("."))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            p = Path(root) / f
            if is_image_file(p) or is_dicom_file(p):
                found.append(p)
            elif skipped is not None:
                skipped.names.append(f)
    return sorted(found, key=lambda p: p.as_posix())


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _refuse_loose_images(folder: Path, skipped: _Skipped) -> None:
    """Images next to class (or split) folders have no label: refuse them rather than drop them."""
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
    loose = [p.name for p in files if is_image_file(p) or is_dicom_file(p)]
    skipped.names.extend(p.name for p in files if p.name not in loose)
    if loose:
        shown = ", ".join(loose[:5]) + (f" and {len(loose) - 5} more" if len(loose) > 5 else "")
        raise SourceError(
            f"{folder}: {len(loose)} image(s) lie beside the class folders ({shown}), so their label is unknown. "
            f"Move each into its class folder, or pass a list of paths or a CSV manifest instead."
        )


def _class_folders(folder: Path, split: str, class_map, skipped: _Skipped) -> list[ImageRecord]:
    _refuse_loose_images(folder, skipped)
    records = []
    for class_dir in _subdirs(folder):
        label = label_for_class_name(class_dir.name, class_map)
        for p in _images_in(class_dir, skipped):
            records.append(_record(p, label, class_dir.name, split))
    return records


def records_from_folder(folder: Path, class_map=None) -> list[ImageRecord]:
    """Records of a folder source; files that are neither images nor DICOM are skipped in one logged line."""
    skipped = _Skipped()
    records = _folder_records(folder, class_map, skipped)
    skipped.log(folder)
    return records


def _folder_records(folder: Path, class_map, skipped: _Skipped) -> list[ImageRecord]:
    subdirs = _subdirs(folder)
    if not subdirs:
        return [_record(p) for p in _images_in(folder, skipped)]
    if (folder / DICOMDIR_NAME).is_file() and not any(_names_a_class(d.name, class_map) for d in subdirs):
        return [_record(p) for p in dicomdir_paths(folder / DICOMDIR_NAME)]  # a DICOM disc: DICOMDIR + DICOM/...
    split_dirs = [d for d in subdirs if d.name.lower() in _SPLIT_NAMES]
    if split_dirs:
        others = [d.name for d in subdirs if d not in split_dirs]
        if others:
            raise SourceError(
                f"{folder}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"folders ({', '.join(others)}). Put every class folder inside a split folder, or remove the split folders."
            )
        _refuse_loose_images(folder, skipped)
        records = []
        for d in split_dirs:
            records.extend(_class_folders(d, _SPLIT_NAMES[d.name.lower()], class_map, skipped))
        return records
    return _class_folders(folder, "", class_map, skipped)


def _names_a_class(name: str, class_map) -> bool:
    """Whether a folder name is a split or a class name (so a DICOMDIR beside it is not the source)."""
    if name.lower() in _SPLIT_NAMES:
        return True
    try:
        label_for_class_name(name, class_map)
    except SourceError:
        return False
    return True


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


def manifest_text(csv_path: Path) -> str:
    """The manifest's text: UTF-8, with or without a byte-order mark (as Excel writes it).

    Any other encoding is refused, naming the line, rather than guessed: a Latin-1 cell decoded by
    guess could name another file than the one meant, and the fix (saving the file as UTF-8) is one step.
    """
    data = Path(csv_path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SourceError(f"{csv_path}, line {line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the manifest as "
                          f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {csv_path}` if it is Latin-1") from None


def path_cell(csv_path: Path, lineno: int, written: str, stripped: str) -> str:
    """A manifest's path cell: as written when a file of that name exists (" spaced.jpg"), else stripped."""
    if "\0" in written:
        raise SourceError(f"{csv_path}, line {lineno}: the path cell holds a NUL byte ({written!r}), which no file "
                          f"name can; fix that line of the manifest")
    if written != stripped and (Path(csv_path).parent / written).exists():
        return written
    return stripped


def records_from_csv(csv_path: Path, class_map=None) -> list[ImageRecord]:
    """Records of a CSV manifest: a path column, optional label, split, group, source, region and projection columns.

    An exact duplicate row (every cell the same as an earlier row's) is dropped with a warning giving
    their count and lines: kept, it would count one image twice in every fold and metric.
    """
    with io.StringIO(manifest_text(csv_path), newline="") as f:
        reader = csv.DictReader(f)
        columns = _csv_columns(csv_path, reader.fieldnames or [])
        records, seen, duplicates = [], set(), []
        for lineno, row in enumerate(reader, start=2):
            key = tuple((k, (v or "").strip() if isinstance(v, str) else repr(v)) for k, v in row.items())
            if key in seen:
                duplicates.append(lineno)
                continue
            seen.add(key)
            records.append(_csv_record(csv_path, lineno, row, columns, class_map))
    if duplicates:
        lines = ", ".join(map(str, duplicates[:5])) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        log.warning("%s: dropped %d exact duplicate row%s (line %s): each repeats an earlier row", csv_path,
                    len(duplicates), "" if len(duplicates) == 1 else "s", lines)
    return records


def _csv_columns(csv_path: Path, fields: Sequence[str]) -> dict:
    """The manifest's column for each record field (None where it has none); a path column is required."""
    path_col = _pick_column(fields, _PATH_COLUMNS)
    if path_col is None:
        raise SourceError(
            f"{csv_path}: no path column. Found columns {fields}; name the column of image paths "
            f"one of {list(_PATH_COLUMNS)}."
        )
    return {"path": path_col, "label": _pick_column(fields, _LABEL_COLUMNS),
            "split": _pick_column(fields, _SPLIT_COLUMNS), "group": _pick_column(fields, _GROUP_COLUMNS),
            **{name: _pick_column(fields, _METADATA_COLUMNS[name]) for name in ROW_METADATA}}


def _csv_record(csv_path: Path, lineno: int, row: dict, columns: dict, class_map) -> ImageRecord:
    def cell(name: str) -> str:
        return (row.get(columns[name]) or "").strip() if columns[name] else ""

    raw = cell("path")
    if not raw:
        raise SourceError(f"{csv_path}, line {lineno}: empty {columns['path']!r}")
    p = Path(path_cell(csv_path, lineno, row.get(columns["path"]) or "", raw))
    if not p.is_absolute():
        p = csv_path.parent / p
    try:
        label, name = _label_from_value(cell("label"), class_map)
    except SourceError as e:
        raise SourceError(f"{csv_path}, line {lineno}: {e}") from None
    split = _SPLIT_NAMES.get(cell("split").lower(), cell("split"))
    if columns["projection"] == "view" and _is_view_name(cell("projection")):
        raise SourceError(f"{csv_path}, line {lineno}: column 'view' holds {cell('projection')!r}, an augmented view "
                          f"name, not a projection: rename the column (a 'view' column is read as the projection)")
    return _record(p, label, name, split, cell("group"), **{k: cell(k) for k in ROW_METADATA})


def _is_view_name(text: str) -> bool:
    """Whether ``text`` names one of fracfeat's augmented views (hflip, rot+10, crop0.8)."""
    try:
        return check_view(text) != ""
    except ConfigError:
        return False


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
        records.append(_record(p, label, name, split, group))
    return records


def load_records(source, *, labels=None, groups=None, splits=None, class_map=None) -> tuple[list[ImageRecord], str]:
    """Resolve ``source`` to records and a one-line description of it (kept in provenance).

    ``source`` is a folder, a CSV manifest, an image file, a list of image paths, or a mapping
    ``{name: source}`` of several of these (a hospital or dataset each): every record of a mapped source
    is tagged ``source=name`` (over any ``source`` column of its manifest), in the mapping's order.
    ``labels=``, ``groups=`` and ``splits=`` apply to a single list of paths only.
    """
    if isinstance(source, Mapping):
        return _records_of_sources(source, class_map, labels, groups, splits)
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
        elif path.name.upper() == DICOMDIR_NAME:
            records, kind = [_record(p) for p in dicomdir_paths(path)], "dicomdir"
        elif is_image_file(path) or is_dicom_file(path):
            records, kind = [_record(path)], "image"
        else:
            raise SourceError(f"source {str(source)!r} is neither a folder, a .csv manifest nor an image file")
        description = f"{kind}:{path.resolve()}"
    else:
        try:
            items = list(source)
        except TypeError:
            raise SourceError(f"source must be a folder, a CSV file, a list of image paths or a mapping "
                              f"{{name: source}}, not {type(source).__name__}") from None
        if items and not all(isinstance(p, (str, os.PathLike)) for p in items):
            raise SourceError("a list source must hold image paths (str or pathlib.Path)")
        records = records_from_paths(items, labels, groups, splits, class_map)
        description = f"paths:{len(records)} files"
    if not records:
        raise SourceError(f"source {source if isinstance(source, (str, os.PathLike)) else 'list'} holds no images "
                          f"(looked for {', '.join(sorted(IMAGE_SUFFIXES | DICOM_SUFFIXES))} and DICOM files)")
    return records, description


def _records_of_sources(sources: Mapping, class_map, labels, groups, splits) -> tuple[list[ImageRecord], str]:
    """load_records of a mapping {name: source}: each source's records tagged with its name."""
    if any(v is not None for v in (labels, groups, splits)):
        raise SourceError("labels=, groups= and splits= apply to a list of paths, not to a mapping of sources; "
                          "give each source a CSV manifest with those columns instead")
    if not sources:
        raise SourceError("the mapping of sources is empty: give {name: folder, CSV or list of paths, ...}")
    records, parts = [], []
    for name, one in sources.items():
        if not isinstance(name, str) or not name.strip() or "=" in name or "\x1f" in name:
            raise SourceError(f"source name {name!r}: give each source a non-empty name without '=', "
                              f"e.g. {{'fracatlas': 'data/fracatlas/manifest.csv'}}")
        if isinstance(one, Mapping):
            raise SourceError(f"source {name!r} is itself a mapping: give a folder, a CSV manifest or a list of paths")
        found, description = load_records(one, class_map=class_map)
        records.extend(replace(r, source=name.strip()) for r in found)
        parts.append(f"{name.strip()}={description}")
    return records, "sources:" + ";".join(parts)
