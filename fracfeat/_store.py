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
from ._faults import pause_point
from ._featureset import FeatureSet, classes_from_rows, join_features

log = logging.getLogger("fracfeat")

FORMAT_NAME = "fracfeat-store"
FORMAT_VERSION = 1
MARKER = "fracfeat-store.json"
_LAYOUT = frozenset({"versions", "tmp", "checkpoints", ".lock", MARKER})
_ROW_DATASETS = ("ids", "paths", "labels", "class_names", "splits", "groups", "truncated")
_CHECKSUMMED = ("features",) + _ROW_DATASETS + ("failures/paths", "failures/ids", "failures/reasons")


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


def records_sha256(ids, paths, labels, class_names, splits, groups) -> str:
    """Hash of the row table (not the features): equal tables mean an identical version."""
    h = hashlib.sha256()
    for row in zip(ids, paths, labels, class_names, splits, groups):
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


@dataclass(frozen=True)
class StoredRows:
    """The feature matrix of one version file, read when called (picklable: a path and a shape)."""

    path: str
    n_rows: int
    n_features: int

    def __call__(self) -> np.ndarray:
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                return f["features"][:]
        except (OSError, KeyError) as e:
            raise StoreError(f"{self.path} cannot be read ({e}); run `fracfeat store verify` on its store, "
                             f"or delete the damaged version file (its rows are recomputed on the next extract)") from None


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

    def describe(self) -> str:
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
    problems: list = field(default_factory=list)

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
            return nums[-1]
        try:
            n = int(str(version).lstrip("vV"))
        except ValueError:
            raise StoreError(f"version {version!r}: give a number, 'v<number>' or 'latest'") from None
        if n not in nums:
            raise StoreError(f"store {self.root} has no version {n}; it has {', '.join(f'v{x}' for x in nums)}")
        return n

    def _open_h5(self, n: int):
        import h5py

        path = self._version_path(n)
        try:
            return h5py.File(path, "r")
        except OSError as e:
            raise StoreError(f"{path} cannot be opened as HDF5 ({e}); run `fracfeat store verify {self.root}`") from None

    def info(self, version="latest") -> VersionInfo:
        n = self.resolve(version)
        with self._open_h5(n) as f:
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
        out = []
        for n in self.version_numbers():
            with self._open_h5(n) as f:
                out.append(self._info_from(n, f))
        return out

    def provenance(self, version="latest") -> dict:
        n = self.resolve(version)
        with self._open_h5(n) as f:
            return json.loads(f.attrs["provenance"])

    @contextmanager
    def _damage_reported(self, path: Path):
        """Turn HDF5 read errors (a damaged chunk fails its gzip/zlib check) into a StoreError saying what to do."""
        try:
            yield
        except (OSError, KeyError) as e:
            raise StoreError(f"{path} is damaged: {e}. Run `fracfeat store verify {self.root}` to see what; "
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
        with self._open_h5(n) as f, self._damage_reported(self._version_path(n)):
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
                X=None if lazy else features[:], x_loader=StoredRows(str(self._version_path(n)), *features.shape),
                y=y, ids=_as_str_array(f["ids"][:]), paths=_as_str_array(f["paths"][:]),
                groups=_as_str_array(f["groups"][:]), splits=_as_str_array(f["splits"][:]),
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
            with self._open_h5(n) as f:
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
        reports = []
        for n in nums:
            r = VerifyReport(n, str(self._version_path(n)))
            try:
                with self._open_h5(n) as f:
                    if f.attrs.get("format") != FORMAT_NAME or int(f.attrs.get("complete", 0)) != 1:
                        r.problems.append("not a complete fracfeat version file")
                    expected = json.loads(f.attrs.get("checksums", "{}"))
                    for name in _CHECKSUMMED:
                        if name not in f:
                            r.problems.append(f"dataset {name!r} is missing")
                            continue
                        try:
                            got = dataset_sha256(f[name])
                        except Exception as e:  # a damaged chunk fails to decompress
                            r.problems.append(f"dataset {name!r} cannot be read: {e}")
                            continue
                        if expected.get(name) != got:
                            r.problems.append(f"dataset {name!r} does not match its checksum (damaged)")
            except StoreError as e:
                r.problems.append(str(e))
            reports.append(r)
        return reports

    # -- the cache ------------------------------------------------------------------------------
    def _checkpoint_dir(self, fingerprint: str) -> Path:
        return self.root / "checkpoints" / fingerprint[:32]

    def _cache_files(self, fingerprint: str) -> list[Path]:
        files = []
        for n in self.version_numbers():
            p = self._version_path(n)
            try:
                import h5py

                with h5py.File(p, "r") as f:
                    if f.attrs.get("fingerprint") == fingerprint:
                        files.append(p)
            except OSError:
                log.warning("skipping unreadable version file %s (run verify)", p)
        cdir = self._checkpoint_dir(fingerprint)
        if cdir.is_dir():
            files.extend(sorted(cdir.glob("*.h5")))
        return files

    def cache_index(self, fingerprint: str) -> dict[str, tuple[Path, int, bool]]:
        """id -> (file, row, truncated) for every row ever computed under ``fingerprint``.

        A snapshot: a writer may add checkpoints, and remove them once committed. Read inside
        ``with store.writer():``, it holds until that writer commits.
        """
        import h5py

        index: dict[str, tuple[Path, int, bool]] = {}
        if not self.root.is_dir():
            return index
        for p in self._cache_files(fingerprint):
            try:
                with h5py.File(p, "r") as f:
                    if f.attrs.get("fingerprint") != fingerprint:
                        continue
                    flags = f["truncated"][:] if "truncated" in f else np.zeros(f["ids"].shape[0], np.int8)
                    for row, (i, t) in enumerate(zip(f["ids"][:], flags)):
                        index.setdefault(i.decode("ascii"), (p, row, bool(t)))
            except (OSError, KeyError):
                log.warning("skipping unreadable cache file %s", p)
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
            _create_layout(self.root)
            _clean_tmp(self.root)
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
    from filelock import FileLock, Timeout

    _refuse_foreign(root)  # before the lock file is made, so a foreign directory is left as it was
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("store %s is being written by another process; waiting up to %ss", root, timeout)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise StoreError(
                f"store {root} is locked by another writer (held for more than {timeout}s). "
                f"Wait for it to finish, or use another store= directory."
            ) from None
    try:
        yield
    finally:
        lock.release()


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
        tmp.write_text(json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION}) + "\n")
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


class RowWriter:
    """Writes a new version file in ``tmp/``, rows streamed in order; :class:`StoreWriter` commits it."""

    def __init__(self, store: "FeatureStore", n_rows: int, n_features: int):
        import h5py

        self.store = store
        self.tmp_path = store.root / "tmp" / f"{uuid.uuid4().hex}.h5"
        self.file = h5py.File(self.tmp_path, "w")
        chunk_rows = max(1, min(n_rows, max(1, (1 << 20) // max(4 * n_features, 1))))
        self.features = self.file.create_dataset(
            "features", shape=(n_rows, n_features), dtype="float32",
            chunks=(chunk_rows, n_features) if n_rows else None,
            compression="gzip" if n_rows else None, compression_opts=1 if n_rows else None,
            shuffle=bool(n_rows),
        )
        self.n_rows = n_rows

    def write(self, start: int, rows: np.ndarray) -> None:
        self.features[start:start + len(rows)] = rows
        pause_point("version")

    def finish(self, table: dict, failures: list[dict], attrs: dict) -> None:
        f = self.file
        s = _str_dtype()
        f.create_dataset("ids", data=np.array(table["ids"], dtype="S64"))
        for name in ("paths", "class_names", "splits", "groups"):
            f.create_dataset(name, data=_as_str_array(table[name]), dtype=s)
        f.create_dataset("labels", data=np.asarray(table["labels"], dtype=np.int8))
        f.create_dataset("truncated", data=np.asarray(table["truncated"], dtype=np.int8))
        g = f.create_group("failures")
        g.create_dataset("paths", data=_as_str_array([x["path"] for x in failures]), dtype=s)
        g.create_dataset("ids", data=_as_str_array([x.get("id", "") for x in failures]), dtype=s)
        g.create_dataset("reasons", data=_as_str_array([x["reason"] for x in failures]), dtype=s)
        checksums = {name: dataset_sha256(f[name]) for name in _CHECKSUMMED}
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["checksums"] = json.dumps(checksums, sort_keys=True)
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = 0  # set to 1 under the lock, just before the rename
        self.file.close()

    def abort(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass
        self.tmp_path.unlink(missing_ok=True)


class StoreWriter:
    """The write steps of a store, for the one process holding its writer lock.

    Only ``with store.writer() as w:`` (:meth:`FeatureStore.writer`) makes one, with the lock taken,
    the layout created and ``tmp/`` emptied; once the block is left every step raises StoreError.
    ``extract``, in the block, reads the cache (:meth:`FeatureStore.cache_index`: under the lock,
    what it finds stays true until the commit), then calls :meth:`write_checkpoint` as rows are
    computed, :meth:`find_identical`, :meth:`write_version` (which numbers the version and finds its
    parent, :meth:`latest_with_fingerprint`) and :meth:`remove_checkpoints`. The writer owns the
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
        """Persist freshly computed rows atomically, so a killed run loses at most one checkpoint."""
        import h5py

        cdir = self.store._checkpoint_dir(fingerprint)
        cdir.mkdir(parents=True, exist_ok=True)
        final = cdir / f"{run_id}-{seq:06d}.h5"
        tmp = self.store.root / "tmp" / f"ckpt-{uuid.uuid4().hex}.h5"
        with h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = fingerprint
            f.create_dataset("ids", data=np.array(list(ids), dtype="S64"))
            f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            pause_point("checkpoint")
            f.create_dataset("truncated", data=np.asarray(truncated, dtype=np.int8))
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(cdir)
        return final

    @_while_held
    def find_identical(self, fingerprint: str, content_sha256: str) -> int | None:
        """The latest version of ``fingerprint`` whose ``content_sha256`` is this one, or None."""
        import h5py

        for n in reversed(self.store.version_numbers()):
            with h5py.File(self.store._version_path(n), "r") as f:
                if f.attrs.get("fingerprint") == fingerprint and f.attrs.get("content_sha256") == content_sha256:
                    return n
        return None

    @_while_held
    def latest_with_fingerprint(self, fingerprint: str) -> int:
        """The latest version made under ``fingerprint`` (0: none): a new version's parent."""
        import h5py

        for n in reversed(self.store.version_numbers()):
            with h5py.File(self.store._version_path(n), "r") as f:
                if f.attrs.get("fingerprint") == fingerprint:
                    return n
        return 0

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
        n_features = self._gather(locations[:1]).shape[1]
        rows_writer = RowWriter(self.store, len(locations), n_features)
        try:
            for start in range(0, len(locations), _ASSEMBLY_CHUNK):
                rows = self._gather(locations[start:start + _ASSEMBLY_CHUNK])
                if rows.shape[1] != n_features:
                    raise ConfigError(f"cached rows disagree on feature width ({rows.shape[1]} vs {n_features}); "
                                      f"the store at {self.store.root} is damaged: run verify")
                rows_writer.write(start, rows)
            provenance = {**provenance, "n_features": int(n_features)}
            attrs = {"provenance": json.dumps(provenance, sort_keys=True, default=str), "fingerprint": fingerprint,
                     "content_sha256": content_sha256, **{k: provenance[k] for k in _PROVENANCE_ATTRS}}
            rows_writer.finish(table, failures, attrs)
            return self._commit(rows_writer, fingerprint)
        except BaseException:
            rows_writer.abort()
            raise

    def _gather(self, locations) -> np.ndarray:
        """Feature rows at (file, row, ...) locations (as ``cache_index`` gives them), in the order given."""
        import h5py

        out = None
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for k, (p, row, *_) in enumerate(locations):
            by_file.setdefault(p, []).append((k, row))
        for p, items in by_file.items():
            with self.store._damage_reported(Path(p)), h5py.File(p, "r") as f:
                ds = f["features"]
                if out is None:
                    out = np.empty((len(locations), ds.shape[1]), dtype=np.float32)
                ks = np.array([k for k, _ in items])
                out[ks] = read_rows(ds, np.array([r for _, r in items]))
        return out if out is not None else np.empty((0, 0), np.float32)

    def _commit(self, rows_writer: RowWriter, fingerprint: str) -> int:
        """Number the finished tmp file and rename it into versions/."""
        import h5py

        n = (self.store.version_numbers() or [0])[-1] + 1
        parent = self.latest_with_fingerprint(fingerprint)
        with h5py.File(rows_writer.tmp_path, "r+") as f:
            prov = json.loads(f.attrs["provenance"])
            prov.update(version=n, parent=parent)
            f.attrs["provenance"] = json.dumps(prov, sort_keys=True)
            f.attrs["version"] = n
            f.attrs["parent"] = parent
            f.attrs["complete"] = 1
        _fsync_file(rows_writer.tmp_path)
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
        import h5py

        cdir = self.store._checkpoint_dir(fingerprint)
        if not cdir.is_dir():
            return
        for p in cdir.glob("*.h5"):
            try:
                with h5py.File(p, "r") as f:
                    ids = {i.decode("ascii") for i in f["ids"][:]}
            except OSError:
                ids = set()
            if ids <= covered_ids:
                p.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
