"""The versioned HDF5 feature store. It knows nothing of Keras or images.

Layout of a store directory (docs/store-format.md is the reference)::

    STORE/
      fracfeat-store.json          marker: format name and version
      versions/v000001.h5          one immutable, self-contained HDF5 file per version
      checkpoints/<fp>/<run>-<k>.h5  rows computed by runs that have not committed yet
      tmp/                         files being written (never read)
      .lock                        taken by writers (filelock)

Why one file per version: a version is written to ``tmp/`` and published into ``versions/`` by one
hard link (or ``os.replace``), so a crash can never leave a half-written version that looks
complete, and an existing version file is never opened for writing again. Plain h5py or h5dump
reads any version file on its own.

The cache: rows are keyed by (extractor fingerprint, sha256 of the image bytes). Every version and
checkpoint file of a fingerprint is a cache source; ``extract`` computes only ids none of them hold.

Reading and writing are apart: :class:`FeatureStore` only reads (any number of readers, no lock).
Every write goes through a :class:`StoreWriter`, which exists only inside ``with store.writer():``,
the writer lock held; it writes checkpoints and version files and owns their attributes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ._config import options_text
from ._errors import ConfigError, StoreError
from ._faults import pause_point, write_fault
from ._featureset import METADATA_ATTRS, FeatureSet, classes_from_rows, join_features
from ._version import __version__

log = logging.getLogger("fracfeat")

FORMAT_NAME = "fracfeat-store"
FORMAT_VERSION = 2  # 2: attributes and checkpoints under checksums too; 1 (fracfeat <= 0.3.0) is still read
MARKER = "fracfeat-store.json"
_LAYOUT = frozenset({"versions", "tmp", "checkpoints", ".lock", MARKER})
_ROW_DATASETS = ("ids", "paths", "labels", "class_names", "splits", "groups", "truncated")
# Row datasets of each record's metadata (source, body region, projection), which versions written before
# each existed lack (sources, regions: fracfeat 0.3 and earlier; projections: 0.4): read as "".
_OPTIONAL_ROW_DATASETS = METADATA_ATTRS


def _str_dtype():
    import h5py

    return h5py.string_dtype("utf-8")


def utf8_safe(text: str) -> str:
    """``text`` made encodable as UTF-8, as HDF5 string datasets require.

    A Linux file name may hold bytes that are not UTF-8 (Python keeps them as lone surrogates);
    those bytes are written as ``\\xff`` escapes, so the name stays readable and unique.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _as_str_array(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v.decode("utf-8") if isinstance(v, bytes) else utf8_safe(str(v))
    return out


def dataset_sha256(ds) -> str:
    """sha256 of a dataset's logical content (independent of chunking and compression)."""
    h = hashlib.sha256()
    n = ds.shape[0] if ds.shape else 0
    step = max(1, (64 << 20) // max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * max(ds.dtype.itemsize, 1)))
    for start in range(0, n, step):
        block = ds[start:start + step]
        if block.dtype.kind in ("O", "S", "U"):
            for v in block:
                h.update(v if isinstance(v, bytes) else str(v).encode("utf-8"))
                h.update(b"\0")
        else:
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def records_sha256(ids, paths, labels, class_names, splits, groups, *metadata) -> str:
    """Hash of the row table (not the features): equal tables mean an identical version.

    ``metadata``: the ``METADATA_ATTRS`` columns (sources, regions, projections; None: all ""). They
    enter up to the last non-empty one, sources and regions always together (they came together), so a
    table hashes as it did before its empty columns existed (versions written then keep their content hash).
    """
    h = hashlib.sha256()
    columns = [ids, paths, labels, class_names, splits, groups]
    extra = [[""] * len(ids) if c is None else c for c in (*metadata, *[None] * (2 - len(metadata)))]
    used = [i for i, c in enumerate(extra) if any(str(v) for v in c)]
    if used:
        columns += extra[:max(2, used[-1] + 1)]
    for row in zip(*columns):
        h.update(utf8_safe("\x1f".join(str(v) for v in row)).encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()


def read_rows(ds, rows: np.ndarray) -> np.ndarray:
    """``ds[rows]`` for any (unsorted, repeated) integer rows, reading contiguous spans where cheap."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.empty((0,) + ds.shape[1:], dtype=ds.dtype)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 4 * len(rows) + 64:
        return ds[lo:hi][rows - lo]
    uniq, inverse = np.unique(rows, return_inverse=True)
    return ds[uniq][inverse]


# -- reading files, and their checksums (docs/store-format.md, "Checksums") ---------------------------
SEAL = "checksums_sha256"  # sha256 of the ``checksums`` attribute's own text (format 2)
USERBLOCK = 512  # bytes before the HDF5 data (HDF5's user block): the whole file's sha256 (format 2)
_FILE_SEAL = b"fracfeat-sha256:"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_sealed_ok: dict[str, tuple] = {}  # path -> (size, mtime, inode) of files whose bytes matched, this process


def file_seal_problem(path) -> str | None:
    """What is wrong with a store file's bytes as a whole, checked before HDF5 parses any of them.

    A format-2 file carries the sha256 of everything after its 512-byte user block in that block;
    a damaged file is refused here, so HDF5, which can crash the process on damaged metadata, never
    reads it. None: the bytes match, or the file predates the seal (format 1). A file that matched
    is not hashed again in this process while its size, mtime and inode stay the same.
    """
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    if _sealed_ok.get(str(path)) == key:
        return None
    with open(path, "rb") as f:
        head = f.read(USERBLOCK)
        if head.startswith(_HDF5_SIGNATURE):
            return None  # format 1 (fracfeat <= 0.3.0), or not fracfeat's: no seal to check
        if not head.startswith(_FILE_SEAL):
            return "its file checksum (the first 512 bytes) is damaged, or it is no HDF5 file"
        digest = sealed_sha256(f)
    if head[len(_FILE_SEAL):len(_FILE_SEAL) + 64] != digest.encode():
        return "its bytes do not match the file's checksum (damaged on disk)"
    _sealed_ok[str(path)] = key
    return None


def sealed(f) -> bool:
    """Whether an open store file carries the whole-file seal (format 2), which fracfeat checks before opening."""
    return f.userblock_size == USERBLOCK


def sealed_sha256(f) -> str:
    """sha256 of an open binary file's bytes after the user block, HDF5's file consistency flags as zeros.

    Those flags (4 bytes at offset 20 of a version 0/1 superblock, 1 byte at 11 of version 2/3) are
    the one thing HDF5 changes in a file it merely opens for writing (HDFView does) and restores on
    closing: a file opened so is not damaged.
    """
    f.seek(USERBLOCK)
    first = bytearray(f.read(1 << 20))
    if first[:8] == _HDF5_SIGNATURE and len(first) > 24:
        start, size = (20, 4) if first[8] in (0, 1) else (11, 1)
        first[start:start + size] = bytes(size)
    h = hashlib.sha256(first)
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def isolated_damage(paths: list) -> dict[str, list[str]]:
    """:func:`damage_found` of files that failed their seal, in one child process (HDF5 may crash on them):
    path -> problems. A file that crashes the child is reported so, and the child restarted for the rest."""
    import subprocess
    import sys

    code = ("import json, sys\nfrom fracfeat._store import damage_found, open_h5\nfor p in sys.argv[1:]:\n"
            "    print(json.dumps([p, 'start']), flush=True)\n    try:\n        with open_h5(p) as f:\n"
            "            found = damage_found(f)[0]\n    except Exception as e:\n"
            "        found = [f'HDF5 cannot read it: {e}'[:200]]\n    print(json.dumps([p, found]), flush=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out: dict[str, list[str]] = {}
    todo = [str(p) for p in paths]
    while todo:
        try:
            done = subprocess.run([sys.executable, "-c", code, *todo], capture_output=True, text=True, timeout=600,
                                  env=env)
        except Exception as e:
            return {**out, **{p: [f"it cannot be examined further ({_short(e)})"] for p in todo}}
        started = None
        for line in done.stdout.splitlines():
            p, found = json.loads(line)
            if found == "start":
                started = p
            else:
                out[p], started = found, None
        if started is not None:  # the child died on this file
            out[started] = [f"HDF5 crashes reading it (exit {done.returncode}): its internal structure is damaged"]
        elif done.returncode != 0:
            return {**out, **{p: [f"it cannot be examined further (exit {done.returncode})"] for p in todo if p not in out}}
        todo = [p for p in todo if p not in out]
    return out


def open_h5(path):
    """Open a store file for reading without HDF5's file lock.

    A committed file never changes, so there is nothing to lock against; and HDF5's lock would make
    a healthy version unreadable while another program (HDFView, h5py mode "a") holds it open.
    ``locking=False`` scopes that to fracfeat's own reads, unlike ``HDF5_USE_FILE_LOCKING``, which
    changes every HDF5 file of the process.
    """
    import h5py

    return h5py.File(path, "r", locking=False)


def attr_sha256(value) -> str:
    """sha256 of an attribute's value as h5py reads it back (its JSON)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    elif hasattr(value, "tolist"):
        value = value.tolist()
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8", "surrogateescape")).hexdigest()


def dataset_names(f) -> list[str]:
    """Every dataset of an open HDF5 file, groups walked (``failures/paths``)."""
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if hasattr(obj, "dtype") else None)
    return sorted(names)


def file_checksums(f, known: dict | None = None) -> dict:
    """``name -> sha256`` of every dataset of ``f`` and ``"@name" -> sha256`` of every root attribute but
    the checksums themselves: whatever the file holds, so a dataset added later is covered unasked.
    ``known`` holds checksums the writer has already (the features, hashed as they were streamed)."""
    known = known or {}
    sums = {name: known.get(name) or dataset_sha256(f[name]) for name in dataset_names(f)}
    sums.update({f"@{k}": attr_sha256(f.attrs[k]) for k in f.attrs if k not in ("checksums", SEAL)})
    return sums


def seal_checksums(f, sums: dict) -> None:
    """Write ``sums`` as the ``checksums`` attribute and its own sha256 beside it."""
    text = json.dumps(sums, sort_keys=True)
    f.attrs["checksums"] = text
    f.attrs[SEAL] = hashlib.sha256(text.encode("utf-8")).hexdigest()


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


def damage_found(f, features=None, full: bool = True) -> tuple[list[str], list[str]]:
    """What in ``f`` does not match its checksums (problems), and the checks an older file lacks (notes).

    ``full=False`` leaves the features dataset out (the cheap check ``open`` makes), unless its values,
    already read, are given as ``features``. Never raises: damage that breaks reading is a problem too.
    """
    notes: list[str] = []
    try:
        text = f.attrs["checksums"]
        expected = json.loads(text)
        if not isinstance(expected, dict):
            raise ValueError("not a JSON object")
        seal = f.attrs.get(SEAL)
    except Exception as e:
        return [f"attribute 'checksums' is damaged or missing ({_short(e)})"], notes
    if seal is None:
        notes.append(f"written by fracfeat {f.attrs.get('fracfeat_version', '<= 0.3.0')} (format 1): its attributes "
                     f"(provenance, fingerprint...) and the checksums attribute are not under a checksum; only its "
                     f"datasets are checked")
    elif hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest() != str(seal):
        return [f"attribute 'checksums' (or '{SEAL}') is damaged: it does not match its own checksum"], notes
    problems: list[str] = []
    try:
        for name in sorted(set(dataset_names(f)) | {k for k in expected if not k.startswith("@")}):
            if name != "features" or full or features is not None:
                problems += _dataset_damage(f, name, expected, features if name == "features" else None,
                                            seal is not None, notes)
        if seal is not None:
            present = set(f.attrs) - {"checksums", SEAL}
            for key in sorted(present | {k[1:] for k in expected if k.startswith("@")}):
                problems += _attribute_damage(f, key, expected.get(f"@{key}"), key in present)
    except Exception as e:  # the file's own structure (object headers, B-trees) is damaged
        problems.append(f"the file's structure is damaged ({_short(e)})")
    return problems, notes


def _dataset_damage(f, name: str, expected: dict, values, sealed: bool, notes: list) -> list[str]:
    if name not in f:
        return [f"dataset {name!r} is missing"]
    if name not in expected:
        if sealed:
            return [f"dataset {name!r} has no checksum (added to the file after it was written)"]
        notes.append(f"dataset {name!r} is not under a checksum")
        return []
    try:
        got = dataset_sha256(f[name] if values is None else values)
    except Exception as e:  # a damaged chunk fails to decompress, a damaged string reference to resolve
        return [f"dataset {name!r} cannot be read: {_short(e)}"]
    return [] if got == expected[name] else [f"dataset {name!r} does not match its checksum (damaged)"]


def _attribute_damage(f, key: str, expected, present: bool) -> list[str]:
    if not present:
        return [f"attribute {key!r} is missing"]
    if expected is None:
        return [f"attribute {key!r} has no checksum (added to the file after it was written)"]
    try:
        got = attr_sha256(f.attrs[key])
    except Exception as e:
        return [f"attribute {key!r} cannot be read: {_short(e)}"]
    return [] if got == expected else [f"attribute {key!r} does not match its checksum (damaged)"]


def _attr_or_none(f, name: str):
    """Root attribute ``name`` as a plain value, or None where it is missing or cannot be read."""
    try:
        value = f.attrs.get(name)
    except Exception:
        return None
    return value.item() if isinstance(value, np.generic) else value


def marker_text() -> str:
    return json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "fracfeat_version": __version__}) + "\n"


def check_marker(root: Path) -> None:
    """StoreError unless ``root``'s marker names a fracfeat store whose format this code reads."""
    path = root / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is damaged ({_short(e)}); if {root} is a fracfeat store, write {marker_text().strip()} "
                         f"into it") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        found = marker.get("format") if isinstance(marker, dict) else marker
        raise StoreError(f"{root} is not a fracfeat store ({MARKER} names format {found!r}); point to a store directory")
    refuse_newer(str(path), marker.get("format_version"), marker.get("fracfeat_version"))


def refuse_newer(what: str, format_version, written_by) -> None:
    """StoreError naming the fracfeat to install, if ``format_version`` is newer than this code reads."""
    if isinstance(format_version, (int, np.integer)) and int(format_version) > FORMAT_VERSION:
        who = f"fracfeat {written_by}" if written_by else f"a fracfeat newer than {__version__}"
        pin = f"'fracfeat>={written_by}'" if written_by else "-U fracfeat"
        raise StoreError(f"{what} has store format {int(format_version)}, newer than fracfeat {__version__} reads "
                         f"(formats 1 to {FORMAT_VERSION}): it was written by {who}; upgrade with `pip install {pin}`")


@dataclass(frozen=True)
class StoredRows:
    """The feature matrix of one version file, read when called (picklable: a path and a shape)."""

    path: str
    n_rows: int
    n_features: int
    sha256: str = ""  # the features' checksum, checked on every read ("": none known, an old pickle)

    def __call__(self) -> np.ndarray:
        try:
            problem = file_seal_problem(self.path)
            if problem:
                raise StoreError(problem)
            with open_h5(self.path) as f:
                rows = f["features"][:]
        except Exception as e:
            raise StoreError(f"{self.path} cannot be read ({_short(e)}); run `fracfeat store verify` on its store, "
                             f"or delete the damaged version file (its rows are recomputed on the next extract)") from None
        if self.sha256 and dataset_sha256(rows) != self.sha256:
            raise StoreError(f"{self.path} is damaged: dataset 'features' does not match its checksum; run `fracfeat "
                             f"store verify` on its store, and delete the damaged version file (its rows are recomputed "
                             f"on the next extract)")
        return rows


def version_list(ref) -> list[str] | None:
    """The versions a reference names: ``"3"``/``"v3"``/``3`` -> ``["3"]``, ``"2+3"`` -> ``["2", "3"]`` (joined),
    ``"latest"``/None -> ``["latest"]``; None when ``ref`` does not read as a version reference."""
    if ref is None or str(ref).strip().lower() == "latest":
        return ["latest"]
    tokens = [v.strip().lstrip("vV") for v in str(ref).split("+")]
    return tokens if all(t.isdigit() for t in tokens) else None


def _options_text(attrs) -> str:
    """``tiles=3 layers=block3_pool,block4_pool view=hflip``: the options a version's extractor was given."""
    try:
        return options_text(json.loads(attrs.get("provenance", "{}")))
    except (TypeError, ValueError):
        return ""


@dataclass(frozen=True)
class VersionInfo:
    """What ``FeatureStore.versions()`` lists for each version."""

    version: int
    path: str
    created: str
    fingerprint: str
    backbone: str
    image_size: int
    pooling: str
    n_images: int
    n_features: int
    n_failed: int
    parent: int
    source: str
    options: str = ""  # extractor options beyond size and pooling: tiles, scales, layers, view
    problem: str = ""  # why the file cannot be used ("foreign: ...", "damaged: ..."); "" for a good version

    @classmethod
    def unusable(cls, version: int, path, problem: str) -> "VersionInfo":
        """The entry of a file in versions/ that is no usable version (foreign, damaged, newer format)."""
        return cls(version, str(path), "", "", "", 0, "", 0, 0, 0, 0, "", problem=problem)

    def describe(self) -> str:
        if self.problem:
            return f"v{self.version}  {self.problem}"
        parent = f", from v{self.parent}" if self.parent else ""
        options = f" {self.options}" if self.options else ""
        return (f"v{self.version}  {self.created}  {self.backbone} {self.image_size}px {self.pooling}{options}  "
                f"{self.n_images} images x {self.n_features}  {self.n_failed} failed{parent}  {self.source}")


@dataclass
class StoreDiff:
    """Images added, removed and relabeled between two versions (by content hash)."""

    a: int
    b: int
    added: list = field(default_factory=list)  # paths in b, not a
    removed: list = field(default_factory=list)  # paths in a, not b
    relabeled: list = field(default_factory=list)  # (path, old label, new label)
    moved: list = field(default_factory=list)  # (old path, new path): same bytes, another path

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.removed or self.relabeled or self.moved)

    def summary(self) -> str:
        return (f"v{self.a} -> v{self.b}: {len(self.added)} added, {len(self.removed)} removed, "
                f"{len(self.relabeled)} relabeled, {len(self.moved)} moved")


@dataclass
class VerifyReport:
    version: int
    path: str
    problems: list = field(default_factory=list)  # damage found: the version must not be used
    notes: list = field(default_factory=list)  # checks this (older) file cannot have: not damage

    @property
    def ok(self) -> bool:
        return not self.problems


def _match_rows(rows_a, rows_b, key) -> tuple[list, list, list]:
    """Pair rows of ``a`` and ``b`` with equal ``key`` one to one, in path order.

    Returns the pairs, the rows of ``a`` left unpaired, and the rows of ``b`` left unpaired.
    """
    by_key: dict = {}
    for r in sorted(rows_b, key=lambda r: r[1]):
        by_key.setdefault(key(r), []).append(r)
    pairs, left_a = [], []
    for r in sorted(rows_a, key=lambda r: r[1]):
        candidates = by_key.get(key(r))
        if candidates:
            pairs.append((r, candidates.pop(0)))
        else:
            left_a.append(r)
    left_b = [r for rs in by_key.values() for r in rs]
    return pairs, left_a, left_b


class FeatureStore:
    """A directory of immutable, versioned HDF5 feature files.

    It reads, without a lock; writing goes through :meth:`writer`, which holds the writer lock.

    Parameters
    ----------
    root : str or Path
        The store directory. Created on first write; reading a missing store raises StoreError.
    lock_timeout : float
        Seconds a writer waits for another writer to finish before giving up (-1 waits forever).

    Examples
    --------
    >>> store = FeatureStore("fracfeat-store")          # doctest: +SKIP
    >>> [v.describe() for v in store.versions()]         # doctest: +SKIP
    >>> fs = store.open("latest")                        # doctest: +SKIP
    >>> store.diff(1, 2).summary()                       # doctest: +SKIP
    """

    def __init__(self, root, lock_timeout: float = 600.0):
        self.root = Path(os.fspath(root)).expanduser()
        self.lock_timeout = lock_timeout
        self._warned: set[str] = set()  # warnings about unusable files, given once per FeatureStore

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    # -- layout ---------------------------------------------------------------------------------
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def _version_path(self, n: int) -> Path:
        return self.versions_dir / f"v{n:06d}.h5"

    def exists(self) -> bool:
        return (self.root / MARKER).is_file()

    def _require_exists(self) -> None:
        if not self.exists():
            if self.root.exists() and any(self.root.iterdir()):
                raise StoreError(f"{self.root} is not a fracfeat store (no {MARKER}); point to a store directory")
            raise StoreError(f"no feature store at {self.root}: run extract(..., store={str(self.root)!r}) first")
        check_marker(self.root)

    # -- reading --------------------------------------------------------------------------------
    def version_numbers(self) -> list[int]:
        if not self.versions_dir.is_dir():
            return []
        nums = []
        for p in self.versions_dir.glob("v*.h5"):
            try:
                nums.append(int(p.stem[1:]))
            except ValueError:
                continue
        return sorted(nums)

    def resolve(self, version="latest") -> int:
        """Version number for ``version`` (an int, "latest", "v3" or "3")."""
        self._require_exists()
        nums = self.version_numbers()
        if not nums:
            raise StoreError(f"store {self.root} holds no versions yet: run extract first")
        if version in (None, "latest"):
            return next((n for n in reversed(nums) if not self._is_foreign(n)), nums[-1])
        try:
            n = int(str(version).lstrip("vV"))
        except ValueError:
            raise StoreError(f"version {version!r}: give a number, 'v<number>' or 'latest'") from None
        if n not in nums:
            raise StoreError(f"store {self.root} has no version {n}; it has {', '.join(f'v{x}' for x in nums)}")
        return n

    def _open_h5(self, n: int):
        """Version ``n``'s file, open for reading; StoreError if it is damaged, foreign or of a newer format."""
        path = self._version_path(n)
        fix = (f"delete it (its rows are recomputed on the next extract) or restore it from a copy; `fracfeat store "
               f"verify {self.root}` checks the others")
        try:
            problem = file_seal_problem(path)
            f = None if problem else open_h5(path)
        except Exception as e:
            raise StoreError(f"{path} is damaged: it cannot be opened as HDF5 ({_short(e)}); {fix}") from None
        if problem:
            raise StoreError(f"{path} is damaged: {problem}; {fix}")
        try:
            fmt, written_by = _attr_or_none(f, "format"), _attr_or_none(f, "fracfeat_version")
            if fmt != FORMAT_NAME and _attr_or_none(f, "checksums") is None:
                raise StoreError(f"{path} is foreign: not a fracfeat version file (no format={FORMAT_NAME!r} "
                                 f"attribute); move it out of {self.versions_dir}")
            if fmt != FORMAT_NAME:
                raise StoreError(f"{path} is damaged: its attribute 'format' reads {fmt!r}; {fix}")
            refuse_newer(str(path), _attr_or_none(f, "format_version"), written_by)
        except BaseException:
            f.close()
            raise
        return f

    def _is_foreign(self, n: int) -> bool:
        """Whether version file ``n`` opens as HDF5 but is not fracfeat's (what "latest" skips)."""
        path = self._version_path(n)
        try:
            with open(path, "rb") as raw:
                if not raw.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                    return False  # fracfeat's seal (format 2), or no HDF5 file: not foreign
            with open_h5(path) as f:
                return _attr_or_none(f, "format") != FORMAT_NAME and _attr_or_none(f, "checksums") is None
        except Exception:
            return False

    @contextmanager
    def _checked(self, n: int, features: bool = False):
        """``(file, features)`` of version ``n`` once its checks pass: every dataset and attribute but the
        features, and the features too when ``features`` asks to read them (None otherwise); StoreError
        naming the damage when they do not."""
        path = self._version_path(n)
        with self._open_h5(n) as f, self._damage_reported(path):
            X = f["features"][:] if features else None
            # A sealed file (format 2) passed its whole-file sha256 in _open_h5: every byte is as written
            # and read back. An older one gets the checks of each dataset and attribute it has.
            problems = [] if sealed(f) else damage_found(f, X, full=False)[0]
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StoreError(f"{path} is damaged: {problems[0]}{more}. Run `fracfeat store verify {self.root}`; "
                                 f"delete the damaged version file (its rows are recomputed on the next extract)")
            yield f, X

    def info(self, version="latest") -> VersionInfo:
        n = self.resolve(version)
        with self._open_h5(n) as f, self._damage_reported(self._version_path(n)):
            return self._info_from(n, f)

    def _info_from(self, n: int, f) -> VersionInfo:
        a = f.attrs
        return VersionInfo(
            version=n, path=str(self._version_path(n)), created=str(a.get("created", "")),
            fingerprint=str(a.get("fingerprint", "")), backbone=str(a.get("backbone", "")),
            image_size=int(a.get("image_size", 0)), pooling=str(a.get("pooling", "")),
            n_images=int(f["features"].shape[0]), n_features=int(f["features"].shape[1]),
            n_failed=int(f["failures/paths"].shape[0]), parent=int(a.get("parent", 0)),
            source=str(a.get("source", "")), options=_options_text(a),
        )

    def versions(self) -> list[VersionInfo]:
        """Every version, oldest first."""
        if not self.exists():
            return []
        self._require_exists()
        out = []
        for n in self.version_numbers():
            try:
                with self._open_h5(n) as f, self._damage_reported(self._version_path(n)):
                    out.append(self._info_from(n, f))
            except StoreError as e:  # listed, with what is wrong, so that one bad file hides no other
                kind = "foreign" if " is foreign: " in str(e) else "damaged" if " is damaged" in str(e) else "unusable"
                out.append(VersionInfo.unusable(n, self._version_path(n), f"{kind.upper()}  {e}"))
        return out

    def provenance(self, version="latest") -> dict:
        n = self.resolve(version)
        with self._checked(n) as (f, _):
            return json.loads(f.attrs["provenance"])

    @contextmanager
    def _damage_reported(self, path: Path):
        """Turn HDF5 read errors (a damaged chunk fails its gzip/zlib check) into a StoreError saying what to do."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:  # damaged metadata shows as OSError, KeyError, ValueError, RuntimeError...
            raise StoreError(f"{path} is damaged: {_short(e)}. Run `fracfeat store verify {self.root}` to see what; "
                             f"delete the damaged version file (its rows are recomputed on the next extract)") from None

    def open(self, version="latest", lazy: bool = False) -> FeatureSet:
        """Load a version as a :class:`FeatureSet`.

        With ``lazy=True`` the feature matrix stays on disk until ``.X`` is first read; the per-row
        metadata is loaded either way. ``version="2+3"`` joins versions 2 and 3 side by side
        (:func:`fracfeat.join_features`; not lazy).
        """
        joined = version_list(version)
        if joined is not None and len(joined) > 1:
            return join_features(*(self.open(v) for v in joined))
        n = self.resolve(version)
        with self._checked(n, features=not lazy) as (f, X), self._damage_reported(self._version_path(n)):
            labels = f["labels"][:].astype(np.int64)
            class_names = _as_str_array(f["class_names"][:])
            y = labels if (labels != -1).any() else None
            failures = [
                {"path": p, "id": i, "reason": r}
                for p, i, r in zip(_as_str_array(f["failures/paths"][:]), _as_str_array(f["failures/ids"][:]),
                                   _as_str_array(f["failures/reasons"][:]))
            ]
            provenance = json.loads(f.attrs["provenance"])
            provenance["version"] = n
            features = f["features"]
            return FeatureSet(
                X=X, x_loader=StoredRows(str(self._version_path(n)), *features.shape,
                                         sha256="" if sealed(f) else json.loads(f.attrs["checksums"]).get("features", "")),
                y=y, ids=_as_str_array(f["ids"][:]), paths=_as_str_array(f["paths"][:]),
                groups=_as_str_array(f["groups"][:]), splits=_as_str_array(f["splits"][:]),
                **{name: _as_str_array(f[name][:]) for name in _OPTIONAL_ROW_DATASETS if name in f},
                class_names=class_names, classes=classes_from_rows(labels, class_names), version=n,
                provenance=provenance, failures=failures, truncated=f["truncated"][:].astype(bool),
                store=str(self.root),
            )

    def diff(self, a, b="latest") -> StoreDiff:
        """What changed between versions ``a`` and ``b``, by image content hash.

        Rows are matched one to one, so byte-identical copies (common in real archives) count
        separately: the same content at the same path first, then the same content at another
        path (moved); what is left was added or removed.
        """
        na, nb = self.resolve(a), self.resolve(b)
        rows = []
        for n in (na, nb):
            with self._checked(n) as (f, _):
                rows.append(list(zip(_as_str_array(f["ids"][:]), _as_str_array(f["paths"][:]),
                                     f["labels"][:].tolist())))
        # rows are (id, path, label)
        same, left_a, left_b = _match_rows(*rows, key=lambda r: (r[0], r[1]))
        moved, removed, added = _match_rows(left_a, left_b, key=lambda r: r[0])
        d = StoreDiff(na, nb)
        d.relabeled = [(rb[1], ra[2], rb[2]) for ra, rb in same + moved if ra[2] != rb[2]]
        d.moved = [(ra[1], rb[1]) for ra, rb in moved]
        d.relabeled.sort()
        d.moved.sort(key=lambda m: (m[1], m[0]))
        d.removed = sorted(r[1] for r in removed)
        d.added = sorted(r[1] for r in added)
        return d

    def verify(self, version=None) -> list[VerifyReport]:
        """Recompute every dataset's checksum; a report per version (all versions by default)."""
        self._require_exists()
        nums = self.version_numbers() if version is None else [self.resolve(version)]
        reports, unsealed = [], []
        for n in nums:
            r = VerifyReport(n, str(self._version_path(n)))
            reports.append(r)
            try:
                problem = file_seal_problem(self._version_path(n))
            except OSError as e:
                problem = f"it cannot be read ({_short(e)})"
            if problem:  # the damage is named below, from a child process: HDF5 may crash on the file
                r.problems.append(problem)
                unsealed.append(r)
                continue
            try:
                with self._open_h5(n) as f:
                    if _attr_or_none(f, "complete") != 1:
                        r.problems.append("not a complete fracfeat version file (attribute 'complete' is not 1)")
                    problems, r.notes = damage_found(f)
                    r.problems += problems
            except StoreError as e:
                r.problems.append(str(e))
            except Exception as e:  # whatever a damaged file does, verify reports it and goes on
                r.problems.append(f"cannot be read: {_short(e)}")
        if unsealed:
            named = isolated_damage([r.path for r in unsealed])
            for r in unsealed:
                r.problems += named.get(r.path, [])
        return reports

    # -- the cache ------------------------------------------------------------------------------
    def _checkpoint_dir(self, fingerprint: str) -> Path:
        return self.root / "checkpoints" / fingerprint[:32]

    def usable_versions(self) -> list[tuple[int, dict]]:
        """``(number, attributes)`` of each version file that fracfeat can use (its ``fingerprint`` and
        ``content_sha256``); a foreign, damaged or newer file is skipped with a warning saying what to do."""
        out = []
        for n in self.version_numbers():
            try:
                with self._open_h5(n) as f, self._damage_reported(self._version_path(n)):
                    out.append((n, {k: _attr_or_none(f, k) for k in ("fingerprint", "content_sha256")}))
            except StoreError as e:
                self._warn_once(f"{e} (skipped)")
        return out

    def has_checkpoints(self, fingerprint: str) -> bool:
        """Whether runs under ``fingerprint`` left checkpoint files (a writer folds them in, or removes them)."""
        cdir = self._checkpoint_dir(fingerprint)
        return cdir.is_dir() and any(cdir.glob("*.h5"))

    def identical_version(self, fingerprint: str, content_sha256: str) -> int | None:
        """The latest version of ``fingerprint`` whose ``content_sha256`` is this one, or None (reads only)."""
        for n, attrs in reversed(self.usable_versions()):
            if attrs["fingerprint"] == fingerprint and attrs["content_sha256"] == content_sha256:
                return n
        return None

    def _warn_once(self, message: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if message not in warned:
            warned.add(message)
            log.warning("%s", message)

    def _cache_files(self, fingerprint: str) -> list[Path]:
        files = [self._version_path(n) for n, attrs in self.usable_versions() if attrs["fingerprint"] == fingerprint]
        cdir = self._checkpoint_dir(fingerprint)
        if cdir.is_dir():
            files.extend(sorted(cdir.glob("*.h5")))
        return files

    def cache_index(self, fingerprint: str, set_aside=None) -> dict[str, tuple[Path, int, bool]]:
        """id -> (file, row, truncated) for every row ever computed under ``fingerprint``.

        Only files that pass their checks count: a version's cheap check (as ``open`` makes it), a
        checkpoint's full one (its features too). A checkpoint that fails is handed to ``set_aside``
        (the writer's, which moves it away) or skipped; either way with a warning, and its rows are
        computed again. A snapshot: read inside ``with store.writer():``, it holds until that block ends.
        """
        index: dict[str, tuple[Path, int, bool]] = {}
        if not self.root.is_dir():
            return index
        if self.exists():
            check_marker(self.root)
        for p in self._cache_files(fingerprint):
            checkpoint = p.parent.name != "versions"
            try:
                problems = [file_seal_problem(p)]
                if problems[0] is not None:
                    raise StoreError(problems[0])
                with open_h5(p) as f:
                    if _attr_or_none(f, "fingerprint") != fingerprint:
                        continue
                    problems = [] if sealed(f) else damage_found(f, full=checkpoint)[0]
                    if not problems:
                        flags = f["truncated"][:] if "truncated" in f else np.zeros(f["ids"].shape[0], np.int8)
                        rows = [(i.decode("ascii"), bool(t)) for i, t in zip(f["ids"][:], flags)]
            except StoreError as e:
                problems = [str(e)]
            except Exception as e:
                problems = [f"it cannot be read ({_short(e)})"]
            if problems and checkpoint:
                what = "set aside in set-aside/" if set_aside else "skipped"
                log.warning("checkpoint %s fails its check (%s): %s; its rows are computed again", p, problems[0], what)
                if set_aside:
                    set_aside(p)
            elif problems:
                self._warn_once(f"{p} is damaged ({problems[0]}): not used as a cache; run `fracfeat store verify "
                                f"{self.root}` and delete it (its rows are computed again)")
            else:
                for row, (i, t) in enumerate(rows):
                    index.setdefault(i, (p, row, t))
        return index

    # -- writing --------------------------------------------------------------------------------
    @contextmanager
    def writer(self, lock_timeout: float | None = None) -> Iterator["StoreWriter"]:
        """Hold the store's writer lock and hand out the :class:`StoreWriter` that makes every write.

        Entering takes ``.lock`` (a second writer waits up to ``lock_timeout`` seconds, this store's
        ``lock_timeout`` when None, then raises StoreError), creates the layout on first use and
        empties ``tmp/`` of what killed writers left. Leaving releases the lock; the writer refuses
        every step after that.

        Examples
        --------
        >>> with FeatureStore("fracfeat-store").writer() as w:           # doctest: +SKIP
        ...     parent = w.latest_with_fingerprint(fingerprint)
        """
        timeout = self.lock_timeout if lock_timeout is None else lock_timeout
        with _writer_lock(self.root, timeout):
            # Under the lock: two first writers creating one store at once must not see each other's
            # half-made layout as a foreign directory, nor delete each other's marker file from tmp/.
            try:
                _create_layout(self.root)
                _clean_tmp(self.root)
            except OSError as e:
                raise write_error(self.root, e) from None
            writer = StoreWriter(self, _WRITER_KEY)
            try:
                yield writer
            finally:
                writer._held = False


# -- writing ----------------------------------------------------------------------------------------
# Only a StoreWriter writes, and only ``FeatureStore.writer()`` makes one, holding the lock.

# Root attributes a version file copies from its provenance, so that h5dump and VersionInfo read them
# without parsing the JSON (docs/store-format.md lists them with the others StoreWriter writes).
_PROVENANCE_ATTRS = ("created", "source", "backbone", "image_size", "pooling", "preprocessing", "weights",
                     "precision", "runtime", "fracfeat_version", "keras_version", "keras_backend")
_ASSEMBLY_CHUNK = 1024  # rows copied from the cache into a new version file at a time
_WRITER_KEY = object()  # what FeatureStore.writer() passes to StoreWriter: no one else makes one


def _refuse_foreign(root: Path) -> None:
    """Refuse a path that is a file, or a directory holding anything but a store's layout."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} is a file; give a directory for store=")
    if root.is_dir() and not (root / MARKER).is_file() and any(p.name not in _LAYOUT for p in root.iterdir()):
        raise StoreError(f"{root} exists and is not a fracfeat store; choose an empty or new directory for store=")


@contextmanager
def _writer_lock(root: Path, timeout: float):
    """Exclusive writer lock on the store at ``root``; a second writer waits up to ``timeout`` seconds."""
    from filelock import Timeout

    _refuse_foreign(root)  # before the lock file is made, so a foreign directory is left as it was
    if (root / MARKER).is_file():
        check_marker(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for d in (root, root / "versions", root / "tmp", root / "checkpoints"):
            if d.is_dir() and not os.access(d, os.W_OK):  # a read-only store or filesystem: say so before any work
                raise PermissionError(errno.EACCES, "not writable", str(d))
        lock = _probe_lock(root / ".lock")
        if lock is None:
            log.info("store %s is being written by another process; waiting up to %ss", root, timeout)
            lock = _probe_lock(root / ".lock", timeout)
    except Timeout:  # before OSError: filelock's Timeout is a TimeoutError, an OSError
        raise StoreError(
            f"store {root} is locked by another writer (held for more than {timeout}s). "
            f"Wait for it to finish, or use another store= directory."
        ) from None
    except OSError as e:
        raise write_error(root, e) from None
    try:
        yield
    finally:
        lock.release()


def _probe_lock(path: Path, timeout: float = 0):
    """The writer lock at ``path``, taken; None if another writer holds it (``timeout=0``), else wait.

    A lock file that belongs to another user (a shared store) cannot be opened for writing, but
    ``flock`` needs no write access: it is then taken through a read-only descriptor
    (:class:`SharedLockFile`), which excludes filelock's holders all the same.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except PermissionError:
        if os.name != "posix" or not path.is_file():
            raise
        lock = SharedLockFile(path)
        try:
            lock.acquire(timeout)
        except Timeout:
            if timeout == 0:
                return None
            raise
    except Timeout:
        if timeout == 0:
            return None
        raise
    return lock


class SharedLockFile:
    """``flock`` on a read-only descriptor of a lock file this user may not write (POSIX)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, timeout: float) -> None:
        import fcntl

        from filelock import Timeout

        fd = os.open(self.path, os.O_RDONLY)
        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise Timeout(str(self.path)) from None
                time.sleep(0.05)

    def release(self) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_error(root: Path, e: OSError, path=None) -> StoreError:
    """The one-line StoreError for a store write that failed: a full disk, a read-only store, or else."""
    where = path or e.filename or root
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left on device writing {where} ({_short(e)}): free space on that disk (or move "
                          f"the store {root}), then re-run extract; rows already saved in checkpoints are reused")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"store {root} is read-only for this user ({where}: {e.strerror}), and this extraction must "
                          f"write to it (new rows or a new version): ask its owner for write access (a shared store: "
                          f"`chmod -R g+w` for your group), or pass another store= directory")
    return StoreError(f"cannot write {where} ({_short(e)}): check the disk under {root}, then re-run extract")


def _create_layout(root: Path) -> None:
    """Create the directory layout (idempotent; the caller holds the write lock).

    A directory holding nothing but the store's own layout (a process killed inside this function
    leaves that) is completed, not refused.
    """
    _refuse_foreign(root)
    for d in (root, root / "versions", root / "tmp", root / "checkpoints"):
        d.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if not marker.exists():
        tmp = root / "tmp" / f"marker-{uuid.uuid4().hex}"
        tmp.write_text(marker_text())
        os.replace(tmp, marker)


def _clean_tmp(root: Path) -> None:
    """Remove leftovers of killed writers (the caller holds the write lock: no one else is writing)."""
    tmp = root / "tmp"
    if tmp.is_dir():
        for p in tmp.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)


def _while_held(step):
    """A StoreWriter step runs only inside its ``with store.writer()`` block, the lock held."""

    @functools.wraps(step)
    def guarded(self, *args, **kwargs):
        if not self._held:
            raise StoreError(f"StoreWriter.{step.__name__} on {self.store.root} outside its "
                             f"`with store.writer() as w:` block: the lock is no longer held; write inside the block")
        return step(self, *args, **kwargs)

    return guarded


class CheckedFile:
    """The file object HDF5 writes a store file through, so that no failed write goes unseen.

    HDF5 writing to a path itself reports a full disk only when the file is flushed or closed, and
    h5py's close lets the error pass: the file looks complete, holds zeros where writes failed, and
    HDF5 later crashes the process. Through this object every failure is recorded and raised by
    :meth:`finish`; HDF5 is told each write went through, so it closes cleanly, and the file is discarded.
    """

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self.raw = open(path, "w+b")
        self.error: OSError | None = None

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.raw.write(data)
            except OSError as e:
                self.error = e
        return memoryview(data).nbytes

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size: int | None = None) -> int:
        try:
            return self.raw.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return self.raw.tell() if size is None else size

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as e:
            self.error = self.error or e

    def finish(self) -> None:
        """Flush, fsync and close the file HDF5 has closed; raise the first error any write met."""
        try:
            write_fault(self.kind)  # a test's injected full disk (fracfeat/_faults.py); inert otherwise
            self.raw.flush()
            if self.error is None:
                self._seal()
            os.fsync(self.raw.fileno())
        except OSError as e:
            self.error = self.error or e
        finally:
            try:
                self.raw.close()
            except OSError as e:
                self.error = self.error or e
        if self.error is not None:
            raise self.error

    def _seal(self) -> None:
        """Write the sha256 of everything after the user block into it (read back: HDF5 writes out of order)."""
        digest = sealed_sha256(self.raw)
        self.raw.seek(0)
        self.raw.write(_FILE_SEAL + digest.encode() + b"\n")
        self.raw.flush()

    def discard(self) -> OSError | None:
        """Close and delete the file; the write error it met, if any."""
        try:
            self.raw.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)
        return self.error


@contextmanager
def written_file(root: Path, path: Path, kind: str):
    """A new HDF5 file at ``path`` (through :class:`CheckedFile`): once the block is left, every byte of it
    is on the disk (closed, flushed, fsynced, no write failed); else StoreError and no file."""
    import h5py

    try:
        raw = CheckedFile(path, kind)
    except OSError as e:
        raise write_error(root, e, path) from None
    try:
        with h5py.File(raw, "w", userblock_size=USERBLOCK) as f:
            yield f
        raw.finish()
    except BaseException:
        error = raw.discard()
        if error is not None:
            raise write_error(root, error, path) from None
        raise


def check_written(root: Path, path: Path) -> None:
    """Read a file just written back against its checksums: it counts only if it holds what was written."""
    try:
        problems = [file_seal_problem(path)]
        if problems[0] is None:
            with open_h5(path) as f:
                problems = damage_found(f)[0]
    except Exception as e:
        problems = [f"it cannot be opened ({_short(e)})"]
    if problems:
        path.unlink(missing_ok=True)
        raise StoreError(f"{path} did not read back as written ({problems[0]}): the disk under {root} may be full "
                         f"or failing; free space or check it, then re-run extract")


class RowWriter:
    """Writes a new version file in ``tmp/``, rows streamed in order; :class:`StoreWriter` commits it."""

    def __init__(self, store: "FeatureStore", n_rows: int, n_features: int):
        import h5py

        self.store = store
        self.tmp_path = store.root / "tmp" / f"{uuid.uuid4().hex}.h5"
        try:
            self.raw = CheckedFile(self.tmp_path, "version")
        except OSError as e:
            raise write_error(store.root, e, self.tmp_path) from None
        self.file = h5py.File(self.raw, "w", userblock_size=USERBLOCK)
        self.features_sha256 = hashlib.sha256()  # of the rows as streamed: what the file must read back as
        self.n_written = 0
        chunk_rows = max(1, min(n_rows, max(1, (1 << 20) // max(4 * n_features, 1))))
        self.features = self.file.create_dataset(
            "features", shape=(n_rows, n_features), dtype="float32",
            chunks=(chunk_rows, n_features) if n_rows else None,
            compression="gzip" if n_rows else None, compression_opts=1 if n_rows else None,
            shuffle=bool(n_rows),
        )
        self.n_rows = n_rows

    def write(self, start: int, rows: np.ndarray) -> None:
        if start != self.n_written:
            raise ValueError(f"RowWriter.write: rows are streamed in order (row {self.n_written} next, not {start})")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.features[start:start + len(rows)] = rows
        self.features_sha256.update(rows.tobytes())
        self.n_written += len(rows)
        pause_point("version")

    def finish(self, table: dict, failures: list[dict], attrs: dict) -> None:
        f = self.file
        s = _str_dtype()
        f.create_dataset("ids", data=np.array(table["ids"], dtype="S64"))
        for name in ("paths", "class_names", "splits", "groups"):
            f.create_dataset(name, data=_as_str_array(table[name]), dtype=s)
        for name in _OPTIONAL_ROW_DATASETS:
            f.create_dataset(name, data=_as_str_array(table.get(name) or [""] * len(table["ids"])), dtype=s)
        f.create_dataset("labels", data=np.asarray(table["labels"], dtype=np.int8))
        f.create_dataset("truncated", data=np.asarray(table["truncated"], dtype=np.int8))
        g = f.create_group("failures")
        g.create_dataset("paths", data=_as_str_array([x["path"] for x in failures]), dtype=s)
        g.create_dataset("ids", data=_as_str_array([x.get("id", "") for x in failures]), dtype=s)
        g.create_dataset("reasons", data=_as_str_array([x["reason"] for x in failures]), dtype=s)
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = 1  # it counts only once closed, fsynced and read back (StoreWriter._commit)
        # Every dataset and attribute, whatever the table holds (file_checksums walks the file).
        seal_checksums(f, file_checksums(f, known={"features": self.features_sha256.hexdigest()}))
        self.file.close()
        try:
            self.raw.finish()
        except OSError as e:
            raise write_error(self.store.root, e, self.tmp_path) from None

    def abort(self) -> OSError | None:
        """Drop the unfinished file; the write error it met (a full disk), if any."""
        try:
            self.file.close()
        except Exception:
            pass
        return self.raw.discard()


class StoreWriter:
    """The write steps of a store, for the one process holding its writer lock.

    Only ``with store.writer() as w:`` (:meth:`FeatureStore.writer`) makes one, with the lock taken,
    the layout created and ``tmp/`` emptied; once the block is left every step raises StoreError.
    ``extract`` holds the lock only for single steps, so two extractions compute side by side: it plans
    from :meth:`FeatureStore.cache_index` without the lock, takes the lock for each
    :meth:`write_checkpoint` (a checkpoint is named by its run: private to it), and once more to commit:
    it re-reads the cache there (:meth:`cache_index`: true until that block ends; another writer may have
    committed, and removed the checkpoints its version covers), then calls :meth:`find_identical`,
    :meth:`write_version` (which numbers the version and finds its parent, :meth:`latest_with_fingerprint`)
    and :meth:`remove_checkpoints`. The writer owns the
    attributes of the version files (docs/store-format.md); :class:`FeatureStore` reads them.
    """

    def __init__(self, store: FeatureStore, key):
        if key is not _WRITER_KEY:
            raise TypeError("a StoreWriter comes only from `with store.writer() as w:`, which holds the store's lock")
        self.store = store
        self._held = True

    def __repr__(self) -> str:
        return f"StoreWriter({str(self.store.root)!r}{'' if self._held else ', released'})"

    @_while_held
    def write_checkpoint(self, fingerprint: str, run_id: str, seq: int, ids, features: np.ndarray, truncated) -> Path:
        """Persist freshly computed rows atomically, so a killed run loses at most one checkpoint.

        The file counts only once it is known complete: written, flushed and fsynced without an error
        and read back matching its checksums (taken of the rows in memory); then it is renamed into place.
        """
        root = self.store.root
        cdir = self.store._checkpoint_dir(fingerprint)
        final = cdir / f"{run_id}-{seq:06d}.h5"
        tmp = root / "tmp" / f"ckpt-{uuid.uuid4().hex}.h5"
        data = {"ids": np.array(list(ids), dtype="S64"), "features": np.asarray(features, dtype=np.float32),
                "truncated": np.asarray(truncated, dtype=np.int8)}
        with written_file(root, tmp, "checkpoint") as f:
            f.attrs["fingerprint"] = fingerprint
            f.attrs["format_version"] = FORMAT_VERSION
            f.create_dataset("ids", data=data["ids"])
            f.create_dataset("features", data=data["features"])
            pause_point("checkpoint")
            f.create_dataset("truncated", data=data["truncated"])
            seal_checksums(f, file_checksums(f, known={k: dataset_sha256(v) for k, v in data.items()}))
        check_written(root, tmp)
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        except OSError as e:
            raise write_error(root, e) from None
        _fsync_dir(cdir)
        return final

    @_while_held
    def cache_index(self, fingerprint: str) -> dict[str, tuple[Path, int, bool]]:
        """:meth:`FeatureStore.cache_index`, a checkpoint that fails its check moved into ``set-aside/``."""
        return self.store.cache_index(fingerprint, set_aside=self._set_aside)

    def _set_aside(self, path: Path) -> None:
        try:
            (path.parent / "set-aside").mkdir(exist_ok=True)
            os.replace(path, path.parent / "set-aside" / path.name)
        except OSError as e:
            log.warning("cannot set %s aside (%s); it stays where it is, skipped", path, e)

    @_while_held
    def find_identical(self, fingerprint: str, content_sha256: str) -> int | None:
        """The latest version of ``fingerprint`` whose ``content_sha256`` is this one, or None."""
        return self.store.identical_version(fingerprint, content_sha256)

    @_while_held
    def latest_with_fingerprint(self, fingerprint: str) -> int:
        """The latest version made under ``fingerprint`` (0: none): a new version's parent."""
        return next((n for n, attrs in reversed(self.store.usable_versions()) if attrs["fingerprint"] == fingerprint), 0)

    @_while_held
    def write_version(self, fingerprint: str, table: dict, failures: list[dict], provenance: dict,
                      content_sha256: str, index: dict) -> int:
        """Stream the rows of ``table`` from the cache into a new version file and commit it atomically.

        ``table`` holds the row datasets (``ids``, ``paths``, ``labels``, ``class_names``, ``splits``,
        ``groups``, ``truncated``), ``index`` is :meth:`FeatureStore.cache_index` with this run's
        checkpoints added, ``provenance`` becomes the ``provenance`` attribute (with ``n_features``,
        ``version`` and ``parent`` added). Returns the new version's number.
        """
        locations = [index[d] for d in table["ids"]]
        self._check_sources({Path(p) for p, *_ in locations})
        n_features = self._gather(locations[:1]).shape[1]
        # Numbered before writing (the lock is held: no other writer adds one meanwhile), so the file is
        # written once, whole, and never reopened for writing.
        n = (self.store.version_numbers() or [0])[-1] + 1
        parent = self.latest_with_fingerprint(fingerprint)
        provenance = {**provenance, "n_features": int(n_features), "version": n, "parent": parent}
        attrs = {"provenance": json.dumps(provenance, sort_keys=True, default=str), "fingerprint": fingerprint,
                 "content_sha256": content_sha256, "version": n, "parent": parent,
                 **{k: provenance[k] for k in _PROVENANCE_ATTRS}}
        rows_writer = RowWriter(self.store, len(locations), n_features)
        try:
            for start in range(0, len(locations), _ASSEMBLY_CHUNK):
                rows = self._gather(locations[start:start + _ASSEMBLY_CHUNK])
                if rows.shape[1] != n_features:
                    raise ConfigError(f"cached rows disagree on feature width ({rows.shape[1]} vs {n_features}); "
                                      f"the store at {self.store.root} is damaged: run verify")
                rows_writer.write(start, rows)
            rows_writer.finish(table, failures, attrs)
            return self._commit(rows_writer, n)
        except BaseException as e:
            error = rows_writer.abort()
            if error is not None and not isinstance(e, StoreError):  # what a full disk made HDF5 raise next
                raise write_error(self.store.root, error, rows_writer.tmp_path) from None
            raise

    def _check_sources(self, paths: set[Path]) -> None:
        """Refuse to copy rows out of a committed version whose features fail their checksum."""
        for p in sorted(p for p in paths if p.parent == self.store.versions_dir):
            try:
                with open_h5(p) as f:  # p passed its seal (if it has one) in cache_index
                    ok = sealed(f) or dataset_sha256(f["features"]) == json.loads(f.attrs["checksums"]).get("features")
            except Exception:
                ok = False
            if not ok:
                raise StoreError(f"{p} is damaged (its features do not match their checksum), and this extraction "
                                 f"reuses its rows: delete it (`fracfeat store verify {self.store.root}` lists what "
                                 f"else is damaged), then re-run extract; its rows are computed again")

    def _gather(self, locations) -> np.ndarray:
        """Feature rows at (file, row, ...) locations (as ``cache_index`` gives them), in the order given."""
        out = None
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for k, (p, row, *_) in enumerate(locations):
            by_file.setdefault(p, []).append((k, row))
        for p, items in by_file.items():
            with self.store._damage_reported(Path(p)), open_h5(p) as f:
                ds = f["features"]
                if out is None:
                    out = np.empty((len(locations), ds.shape[1]), dtype=np.float32)
                ks = np.array([k for k, _ in items])
                out[ks] = read_rows(ds, np.array([r for _, r in items]))
        return out if out is not None else np.empty((0, 0), np.float32)

    def _commit(self, rows_writer: RowWriter, n: int) -> int:
        """Read the finished tmp file back against its checksums, then publish it as versions/v<n>.h5."""
        check_written(self.store.root, rows_writer.tmp_path)
        pause_point("commit")
        final = self.store._version_path(n)
        clash = StoreError(f"{final} appeared while committing: another process wrote to {self.store.root} without "
                           f"holding its lock (a network filesystem without working flock?); re-run extract")
        try:
            # A hard link never replaces an existing file, so even a writer that got past the lock
            # cannot overwrite a committed version.
            os.link(rows_writer.tmp_path, final)
        except FileExistsError:
            raise clash from None
        except OSError:  # no hard links on this filesystem: check, then rename
            if final.exists():
                raise clash from None
            os.replace(rows_writer.tmp_path, final)
        else:
            rows_writer.tmp_path.unlink()
        _fsync_dir(self.store.versions_dir)
        return n

    @_while_held
    def remove_checkpoints(self, fingerprint: str, covered_ids: set[str]) -> None:
        """Delete checkpoint files whose rows all live in a committed version now."""
        cdir = self.store._checkpoint_dir(fingerprint)
        if not cdir.is_dir():
            return
        for p in cdir.glob("*.h5"):
            try:
                with open_h5(p) as f:
                    ids = {i.decode("ascii") for i in f["ids"][:]}
            except Exception:  # unreadable: nothing in it can be reused
                ids = set()
            if ids <= covered_ids:
                p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
