"""The store under faults (issue 19): disk full, bit rot, foreign and damaged files, permissions, other programs.

Each fault is real: a full tmpfs (as root) beside an injected ENOSPC (fracfeat/_faults.py, everywhere),
single bits flipped in the stored bytes of every dataset and attribute of a real version file, a store
read by a forked child that dropped root for the 'nobody' user, a version held open read-write by another
process. Nothing under test is mocked.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from children import SETTINGS, as_user, clean_images, start_child
from conftest import REPO
from fracfeat import FeatureStore, StoreError, extract

OLD_STORE = REPO / "tests" / "data" / "stores" / "fracfeat-0.3.0"


@pytest.fixture(autouse=True)
def _fault_counts_reset():
    """FRACFEAT_FAULT counts arrivals per process: each test that sets it in-process counts from 1."""
    from fracfeat import _faults

    _faults.reset()
    yield
    _faults.reset()


def resealed(path: Path) -> None:
    """Recompute a file's seal after a test changed it on purpose (as a newer fracfeat would write it)."""
    from fracfeat._store import _FILE_SEAL, sealed_sha256

    with open(path, "r+b") as f:
        digest = sealed_sha256(f)
        f.seek(0)
        f.write(_FILE_SEAL + digest.encode() + b"\n")


@pytest.fixture(scope="module")
def images(fracatlas) -> list[str]:
    return clean_images(fracatlas, 16)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The 16 images extracted without a fault."""
    return extract(images, store=tmp_path_factory.mktemp("reference") / "store", **SETTINGS)


@pytest.fixture(scope="module")
def version_store(images, tmp_path_factory) -> FeatureStore:
    """A real version with every dataset non-empty: labels, groups, splits, a failure."""
    root = tmp_path_factory.mktemp("flips") / "store"
    paths = images[:4] + [str(root.parent / "missing.jpg")]
    extract(paths, labels=["fractured", "not_fractured"] * 2 + ["fractured"], groups=list("aabbc"),
            splits=["train", "train", "val", "test", "train"], store=root, **SETTINGS)
    return FeatureStore(root)


def rows_of(fs) -> dict:
    return {"X": np.asarray(fs.X), "y": None if fs.y is None else np.asarray(fs.y), "ids": list(fs.ids),
            "paths": list(fs.paths), "groups": list(fs.groups), "splits": list(fs.splits),
            "class_names": list(fs.class_names), "truncated": list(fs.truncated), "failures": fs.failures,
            "provenance": fs.provenance}


def assert_same_rows(a: dict, b: dict) -> None:
    for k in a:
        if k in ("X", "y"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def flipped(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


# -- 1. disk full --------------------------------------------------------------------------------

def test_injected_disk_full_on_a_checkpoint_is_an_error_and_the_rerun_is_exact(images, reference, tmp_path,
                                                                                 monkeypatch):
    """HDF5 reports a full disk only when the file is flushed: the 2nd checkpoint's flush fails. The run stops
    with one clear StoreError, nothing half written is kept, and the re-run reuses only the good checkpoint."""
    store = tmp_path / "store"
    monkeypatch.setenv("FRACFEAT_FAULT", "checkpoint:2")
    with pytest.raises(StoreError, match=r"no space left on device.*free space"):
        extract(images, store=store, **SETTINGS)
    assert len(list((store / "checkpoints").rglob("*.h5"))) == 1
    assert not list((store / "tmp").iterdir())
    monkeypatch.delenv("FRACFEAT_FAULT")
    fs = extract(images, store=store, **SETTINGS)
    assert fs.provenance["n_reused"] == SETTINGS["checkpoint_every"]
    np.testing.assert_array_equal(fs.X, reference.X)
    assert [r.ok for r in FeatureStore(store).verify()] == [True]


def test_injected_disk_full_on_the_version_commits_nothing(images, tmp_path, monkeypatch):
    store = tmp_path / "store"
    extract(images[:4], store=store, **SETTINGS)
    monkeypatch.setenv("FRACFEAT_FAULT", "version:1")
    with pytest.raises(StoreError, match=r"no space left on device"):
        extract(images[:8], store=store, **SETTINGS)
    assert [v.version for v in FeatureStore(store).versions()] == [1]
    assert not list((store / "tmp").iterdir())


@pytest.fixture()
def small_tmpfs():
    """A 1 MiB tmpfs, mounted for the test (root only; skipped where the process may not mount)."""
    where = Path(tempfile.mkdtemp(prefix="fracfeat-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                          text=True) if shutil.which("mount") and os.geteuid() == 0 else None
    if done is None or done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done and done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


def test_real_full_disk_mid_run_is_an_error_and_the_rerun_is_exact(images, reference, small_tmpfs, tmp_path):
    """A real full filesystem: the child's extraction fails cleanly (no segfault, no checkpoint or version
    made of the zeros a failed write leaves), and once space is freed the re-run equals a clean run."""
    store = small_tmpfs / "store"
    extract(images[:4], store=store, **SETTINGS)
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * max(0, free - 24 * 1024))  # room for about one checkpoint of 8 rows
    child = start_child(tmp_path / "children", "full", images, store)
    out, _ = child.proc.communicate(timeout=300)
    log = child.log()
    assert child.proc.returncode == 1, (child.proc.returncode, log)  # an exception, not a signal
    assert "StoreError" in log and "no space left on device" in log, log
    filler.unlink()
    for report in FeatureStore(store).verify():
        assert report.ok, report.problems
    fs = extract(images, store=store, **SETTINGS)
    np.testing.assert_array_equal(fs.X, reference.X)
    assert [r.ok for r in FeatureStore(store).verify()] == [True, True]


# -- 2. checkpoints ------------------------------------------------------------------------------

def left_checkpoints(images, store: Path, monkeypatch) -> list[Path]:
    """Checkpoints of a run that died at its version write (the injected full disk)."""
    monkeypatch.setenv("FRACFEAT_FAULT", "version:1")
    with pytest.raises(StoreError):
        extract(images, store=store, **SETTINGS)
    monkeypatch.delenv("FRACFEAT_FAULT")
    return sorted((store / "checkpoints").rglob("*.h5"))


@pytest.mark.parametrize("damage", ["features", "ids", "checksums"])
def test_a_damaged_checkpoint_is_set_aside_and_its_rows_recomputed(images, reference, tmp_path, monkeypatch,
                                                                   caplog, damage):
    store = tmp_path / "store"
    first = left_checkpoints(images, store, monkeypatch)[0]
    with h5py.File(first, "r") as f:
        offset = f[damage].id.get_offset() + 3 if damage != "checksums" else None
    if offset is None:
        offset = first.read_bytes().index(b'"features"') + 2
    flipped(first, offset)
    with caplog.at_level("WARNING", logger="fracfeat"):
        fs = extract(images, store=store, **SETTINGS)
    assert "set aside" in caplog.text and first.name in caplog.text
    assert fs.provenance["n_computed"] == SETTINGS["checkpoint_every"]  # the damaged checkpoint's rows
    np.testing.assert_array_equal(fs.X, reference.X)
    assert list((store / "checkpoints").rglob("set-aside/*")), "the damaged file is kept, not deleted"


# -- 3. bit flips in a version file ---------------------------------------------------------------

def stored_spans(path: Path) -> dict[str, list[tuple[int, int]]]:
    """name -> (offset, size) spans of the bytes each dataset stores: its raw storage (for strings: their
    heap references) and, for strings, the bytes of the values themselves in the global heap."""
    spans: dict[str, list[tuple[int, int]]] = {}
    data = path.read_bytes()
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if not isinstance(obj, h5py.Dataset) or obj.id.get_storage_size() == 0:
                return
            if obj.chunks:
                info = obj.id.get_chunk_info(0)
                spans[name] = [(info.byte_offset, info.size)]
            else:
                spans[name] = [(obj.id.get_offset(), obj.id.get_storage_size())]
            if h5py.check_string_dtype(obj.dtype) and obj.dtype.kind == "O":
                value = obj[0] if isinstance(obj[0], bytes) else str(obj[0]).encode()
                if len(value) > 3 and data.count(value) == 1:  # only where the value is found unambiguously
                    spans[name].append((data.index(value), len(value)))
        f.visititems(visit)
    return spans


def attribute_offsets(path: Path) -> dict[str, int]:
    """attribute name -> an offset whose flipped bit changes that attribute's value as h5py reads it."""
    data = path.read_bytes()
    with h5py.File(path, "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs}
    out = {}
    probe = path.with_suffix(".probe.h5")
    for name, value in attrs.items():
        raw = value.encode() if isinstance(value, str) else np.asarray(value).tobytes()
        start, tries = 0, 0
        while name not in out and tries < 24 and (at := data.find(raw, start)) >= 0:
            start, tries = at + 1, tries + 1
            spot = at + min(len(raw) - 1, 5)
            probe.write_bytes(data)
            flipped(probe, spot)
            try:
                with h5py.File(probe, "r") as g:
                    changed = g.attrs[name] != value if name in g.attrs else True
            except Exception:
                changed = True
            if changed:
                out[name] = spot
    probe.unlink(missing_ok=True)
    return out


def check_flips(store: FeatureStore, clean: dict, tmp_path: Path, flips: list) -> list[tuple]:
    """Each (label, offset, bit) flipped in its own copy of v1, all copies versions of one store: open()
    raises StoreError or gives identical rows, and one verify() (never raising) reports each refused copy.
    Returns (label, refused, problems) per flip."""
    root = tmp_path / "flips"
    shutil.copytree(store.root, root)
    clean_file = (root / "versions" / "v000001.h5").read_bytes()
    for k, (_, offset, bit) in enumerate(flips, 1):
        path = root / "versions" / f"v{k:06d}.h5"
        path.write_bytes(clean_file)
        flipped(path, offset, bit)
    copy = FeatureStore(root)
    refused = []
    for k, (label, _, _) in enumerate(flips, 1):
        try:
            got = rows_of(copy.open(k))
        except StoreError as e:
            assert "\n" not in str(e) and "verify" in str(e), (label, str(e))
            refused.append(True)
            continue
        refused.append(False)
        got["provenance"] = {**got["provenance"], "version": 1}
        assert_same_rows(clean, got)
    reports = copy.verify()
    for (label, _, _), r, report in zip(flips, refused, reports):
        assert not (r and report.ok), f"{label}: open refused a version that verify passes"
    shutil.rmtree(root)
    return [(label, r, report.problems) for (label, _, _), r, report in zip(flips, refused, reports)]


def test_one_bit_flipped_in_any_dataset_is_refused_and_named(version_store, tmp_path):
    clean = rows_of(version_store.open(1))
    spans = stored_spans(version_store.root / "versions" / "v000001.h5")
    assert {"features", "ids", "labels", "paths", "groups", "splits", "class_names", "failures/paths"} <= set(spans)
    flips = [(name, start + where, where % 8) for name, places in spans.items() for start, size in places
             for where in sorted({0, size // 2, size - 1})]
    for name, refused, problems in check_flips(version_store, clean, tmp_path, flips):
        assert refused, name
        assert any(f"'{name}'" in p for p in problems), (name, problems)


def test_one_bit_flipped_in_any_attribute_is_refused_and_named(version_store, tmp_path):
    clean = rows_of(version_store.open(1))
    offsets = attribute_offsets(version_store.root / "versions" / "v000001.h5")
    assert {"provenance", "checksums", "fingerprint", "version"} <= set(offsets)
    flips = [(name, offset, 0) for name, offset in offsets.items()]
    for name, refused, problems in check_flips(version_store, clean, tmp_path, flips):
        assert refused, name
        named = name if not name.startswith("checksums") else "checksums"
        assert any(f"'{named}'" in p for p in problems), (name, problems)


FLIP_SWEEP = r"""
import json, random, shutil, sys
from pathlib import Path
import numpy as np
from fracfeat import FeatureStore, StoreError
src, work, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
clean = FeatureStore(src).open(1)
data = (src / "versions" / "v000001.h5").read_bytes()
rng = random.Random(19)
root = work / "sweep"
shutil.copytree(src, root)
for k in range(1, n + 1):
    flip = bytearray(data)
    flip[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    (root / "versions" / f"v{k:06d}.h5").write_bytes(bytes(flip))
store = FeatureStore(root)
out = {"refused": 0, "identical": 0, "altered": [], "verify_ok_but_refused": []}
refused = []
for k in range(1, n + 1):
    try:
        fs = store.open(k)
        same = (np.array_equal(fs.X, clean.X) and list(fs.ids) == list(clean.ids) and list(fs.paths) == list(clean.paths)
                and np.array_equal(fs.y, clean.y) and list(fs.groups) == list(clean.groups)
                and list(fs.splits) == list(clean.splits) and fs.failures == clean.failures
                and {**fs.provenance, "version": 1} == clean.provenance)
        if same:
            out["identical"] += 1
        else:
            out["altered"].append(k)
        refused.append(False)
    except StoreError:
        out["refused"] += 1
        refused.append(True)
for k, (r, report) in enumerate(zip(refused, store.verify()), 1):  # verify must not raise
    if r and report.ok:
        out["verify_ok_but_refused"].append(k)
store.versions()  # listing never raises either
print(json.dumps(out))
"""


def test_random_bit_flips_anywhere_never_give_altered_rows_nor_crash(version_store, tmp_path, subprocess_env):
    """Like the tester's 400 random flips, in a child process so that a crash in HDF5 itself would show as a
    failed child rather than take the test run down."""
    done = subprocess.run([sys.executable, "-c", FLIP_SWEEP, str(version_store.root), str(tmp_path), "200"],
                          env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["altered"] == [] and out["verify_ok_but_refused"] == [], out
    assert out["refused"] + out["identical"] == 200


def test_cli_verify_names_a_damaged_checksums_attribute(version_store, tmp_path, python, subprocess_env):
    root = tmp_path / "store"
    shutil.copytree(version_store.root, root)
    path = root / "versions" / "v000001.h5"
    flipped(path, path.read_bytes().index(b'{"@'), 1)  # the checksums attribute's JSON
    r = subprocess.run([python, "-m", "fracfeat", "store", "verify", str(root)], env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "v1  DAMAGED" in r.stdout and "checksums" in r.stdout


def test_a_flipped_label_never_reaches_fit(version_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(version_store.root, root)
    path = root / "versions" / "v000001.h5"
    with h5py.File(path, "r") as f:
        offset = f["labels"].id.get_offset()
    flipped(path, offset)  # row 0: fractured (1) -> not fractured (0)
    with pytest.raises(StoreError, match=r"v000001\.h5 is damaged.*verify"):
        FeatureStore(root).open(1)
    with pytest.raises(StoreError, match=r"v000001\.h5 is damaged.*verify"):
        FeatureStore(root).open(1, lazy=True)
    assert "dataset 'labels' does not match its checksum (damaged)" in FeatureStore(root).verify()[0].problems


# -- versions written by earlier fracfeat --------------------------------------------------------

def test_a_version_written_by_fracfeat_0_3_0_opens_and_verify_says_what_it_lacks(tmp_path):
    meta = json.loads((OLD_STORE.parent / "fracfeat-0.3.0.json").read_text())
    root = tmp_path / "old"
    shutil.copytree(OLD_STORE, root)
    store = FeatureStore(root)
    fs = store.open(1)
    import hashlib

    assert hashlib.sha256(np.ascontiguousarray(fs.X, np.float32).tobytes()).hexdigest() == meta["features_sha256"]
    assert list(fs.ids) == meta["ids"] and list(fs.y) == meta["labels"] and len(fs.failures) == meta["n_failed"]
    (report,) = store.verify()
    assert report.ok, report.problems
    assert any("provenance" in n and "not under a checksum" in n for n in report.notes), report.notes
    assert store.versions()[0].n_images == meta["n_rows"]


# -- 6. permissions ------------------------------------------------------------------------------

@pytest.fixture()
def shared_place(images):
    """A folder in /tmp that another user can reach (pytest's tmp_path is root's only), with copies of 6 images."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user (os.setuid in a forked child)")
    folder = Path(tempfile.mkdtemp(prefix="fracfeat-perm-"))
    folder.chmod(0o755)
    (folder / "img").mkdir()
    copies = []
    for p in images[:6]:
        copies.append(str(folder / "img" / Path(p).name))
        shutil.copy(p, copies[-1])
    try:
        yield folder, copies
    finally:
        shutil.rmtree(folder)


def test_a_read_only_store_serves_cached_rows_and_refuses_writes_in_one_line(shared_place):
    folder, paths = shared_place
    store = folder / "store"
    extract(paths[:4], store=store, **SETTINGS)  # owned by root: read-only for 'nobody'
    got = as_user("nobody", lambda: extract(paths[:4], store=store, **SETTINGS).provenance["n_computed"])
    assert got == "0", got
    got = as_user("nobody", lambda: extract(paths[:5], store=store, **SETTINGS).version)
    assert got.startswith("ERROR StoreError") and "read-only" in got and "\n" not in got, got
    assert "store=" in got


def test_a_lock_file_of_another_user_does_not_stop_a_writer(shared_place):
    folder, paths = shared_place
    store = folder / "store"
    extract(paths[:4], store=store, **SETTINGS)
    nobody = pwd.getpwnam("nobody")
    for p in [store, *store.rglob("*")]:  # a shared store: everything the group's writers own...
        if p.name != ".lock":
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    (store / ".lock").chmod(0o644)  # ...but the lock file, made by root, writable by root only
    # All rows are cached, but a new version is needed (other labels): written under the lock.
    got = as_user("nobody", lambda: extract(paths[:4], labels=["fractured"] * 4, store=store, **SETTINGS).version)
    assert got == "2", got


# -- 7. another program holds a version open -----------------------------------------------------

HOLDER = r"""
import sys, h5py
f = h5py.File(sys.argv[1], "a")  # as HDFView does
print("open", flush=True)
sys.stdin.read()
"""


def test_a_version_held_open_read_write_by_another_program_reads_normally(version_store, images, tmp_path, python):
    root = tmp_path / "store"
    shutil.copytree(version_store.root, root)
    clean = rows_of(version_store.open(1))
    holder = subprocess.Popen([python, "-c", HOLDER, str(root / "versions" / "v000001.h5")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        store = FeatureStore(root)
        assert_same_rows(clean, rows_of(store.open(1)))
        assert [r.ok for r in store.verify()] == [True]
        assert store.versions()[0].n_images == 4
        fs = extract(images[:4], store=root, **SETTINGS)  # the cache reads it too
        assert fs.provenance["n_computed"] == 0
    finally:
        holder.communicate("", timeout=60)


# -- 11. foreign and damaged files ---------------------------------------------------------------

def test_a_foreign_file_in_versions_is_listed_as_foreign_and_skipped(version_store, images, tmp_path, caplog,
                                                                     python, subprocess_env):
    root = tmp_path / "store"
    shutil.copytree(version_store.root, root)
    with h5py.File(root / "versions" / "v000002.h5", "w") as f:
        f.create_dataset("data", data=np.arange(3))
    store = FeatureStore(root)
    listed = store.versions()
    assert [v.version for v in listed] == [1, 2] and "foreign" in listed[1].describe()
    r = subprocess.run([python, "-m", "fracfeat", "store", "list", str(root)], env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "foreign" in r.stdout and "Traceback" not in r.stderr, r.stderr
    assert store.open("latest").version == 1  # latest skips what is not a fracfeat version
    with caplog.at_level("WARNING", logger="fracfeat"):
        fs = extract(images[:5], store=root, **SETTINGS)
    assert fs.version == 3 and "v000002.h5" in caplog.text and "foreign" in caplog.text


def test_a_truncated_version_is_reported_damaged_and_extract_goes_on(version_store, images, tmp_path, caplog):
    root = tmp_path / "store"
    shutil.copytree(version_store.root, root)
    path = root / "versions" / "v000001.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    store = FeatureStore(root)
    with pytest.raises(StoreError, match=r"v000001\.h5.*damaged.*delete"):
        store.open(1)
    assert "damaged" in store.versions()[0].describe()
    with caplog.at_level("WARNING", logger="fracfeat"):
        fs = extract(images[:4], store=root, **SETTINGS)
    assert fs.version == 2 and fs.provenance["n_computed"] == 4 and "v000001.h5" in caplog.text


@pytest.mark.parametrize("marker, match", [
    ({"format": "fracfeat-store", "format_version": 99, "fracfeat_version": "9.1.0"},
     r"store format 99.*fracfeat 9\.1\.0.*pip install"),
    ({"format": "fracfeat-store", "format_version": 99}, r"store format 99.*newer.*pip install"),
    ({"format": "something-else", "format_version": 1}, r"not a fracfeat store"),
])
def test_a_store_format_newer_than_this_code_is_refused(version_store, images, tmp_path, marker, match):
    root = tmp_path / "store"
    shutil.copytree(version_store.root, root)
    (root / "fracfeat-store.json").write_text(json.dumps(marker))
    with pytest.raises(StoreError, match=match):
        FeatureStore(root).open()
    with pytest.raises(StoreError, match=match):
        extract(images[:4], store=root, **SETTINGS)


def test_a_version_file_of_a_newer_format_names_the_fracfeat_it_needs(version_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(version_store.root, root)
    with h5py.File(root / "versions" / "v000001.h5", "r+") as f:
        f.attrs["format_version"] = 99
        f.attrs["fracfeat_version"] = "9.1.0"
    resealed(root / "versions" / "v000001.h5")
    with pytest.raises(StoreError, match=r"format 99.*fracfeat 9\.1\.0"):
        FeatureStore(root).open(1)
