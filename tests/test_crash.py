"""Killed runs lose nothing: a real child extraction is SIGKILLed at several points, then re-run.

Each child is held at a named point by the test hook in fracfeat/_faults.py (FRACFEAT_PAUSE_AT), so the
kill lands exactly there, then killed with SIGKILL. The children start together (their TensorFlow
imports overlap), which keeps the whole module well under CI's 3-minute budget for crash tests.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from children import SETTINGS, clean_images, start_child
from fracfeat import FeatureStore, extract

N_IMAGES = 40
N_BEFORE = 8  # v1 holds the first 8 images; the killed run has 32 rows to compute (8 batches, 4 checkpoints)
CHECKPOINT = SETTINGS["checkpoint_every"]

# pause point -> rows the killed run had computed when it was killed (of the 32 it had to compute)
SCENARIOS = {
    "batch:3": 12,  # decoding/computing: 3 batches of 4 done (1 checkpoint of 8 saved)
    "batch:8": 32,  # decoding/computing: every row done (100%), the last checkpoint not yet written
    "checkpoint:2": 16,  # the 2nd checkpoint half written in tmp/
    "version:1": 32,  # the version file half written in tmp/
    "commit:1": 32,  # the version file complete in tmp/, not renamed into versions/ yet
    "committed:1": 32,  # the version renamed into versions/, its checkpoints not removed yet
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(fracatlas) -> list[str]:
    return clean_images(fracatlas, N_IMAGES)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The same extraction, never interrupted."""
    return extract(images, store=tmp_path_factory.mktemp("reference") / "store", **SETTINGS)


@pytest.fixture(scope="module")
def killed_stores(images, tmp_path_factory) -> dict:
    """scenario -> store where v1 was written, then a child extraction was SIGKILLed at that point."""
    work = tmp_path_factory.mktemp("killed")
    base = work / "base-store"
    extract(images[:N_BEFORE], store=base, **SETTINGS)
    stores, children = {}, {}
    for name in SCENARIOS:
        stores[name] = work / name.replace(":", "-") / "store"
        shutil.copytree(base, stores[name])
        children[name] = start_child(work / "children", name.replace(":", "-"), images, stores[name], pause_at=name)
    try:
        for child in children.values():
            child.wait_held()
    finally:
        for child in children.values():
            child.kill()
    return stores


def every_version_opens_and_verifies(store: FeatureStore) -> list[int]:
    for report in store.verify():
        assert report.ok, (report.path, report.problems)
    numbers = [v.version for v in store.versions()]
    for n in numbers:
        assert len(store.open(n)) > 0
    return numbers


@pytest.mark.parametrize("point", list(SCENARIOS))
def test_rerun_after_sigkill_finishes_and_loses_at_most_one_checkpoint(point, killed_stores, images, reference):
    store = FeatureStore(killed_stores[point])
    before = every_version_opens_and_verifies(store)
    assert before == ([1, 2] if point == "committed:1" else [1])  # no half-written version is visible
    assert len(store.open(1)) == N_BEFORE

    fs = extract(images, store=store.root, **SETTINGS)

    assert fs.version == 2
    if point != "committed:1":  # (after "committed" the re-run finds the killed run's version and returns it)
        saved = fs.provenance["n_reused"] - N_BEFORE  # rows the killed run left in checkpoints
        lost = SCENARIOS[point] - saved
        assert 0 <= lost <= CHECKPOINT, (saved, lost)  # at most one checkpoint of work is recomputed
        assert fs.provenance["n_computed"] == N_IMAGES - fs.provenance["n_reused"]
    assert every_version_opens_and_verifies(store) == [1, 2]
    np.testing.assert_array_equal(fs.ids, reference.ids)
    np.testing.assert_array_equal(fs.X, reference.X)
    # Nothing left behind: checkpoints are folded into the version, tmp/ is empty.
    assert not list((store.root / "checkpoints").rglob("*.h5"))
    assert not list((store.root / "tmp").iterdir())


def test_pause_hook_is_inert_unless_its_point_is_named(tmp_path, monkeypatch):
    import time

    from fracfeat._faults import pause_point

    monkeypatch.delenv("FRACFEAT_PAUSE_AT", raising=False)
    t = time.perf_counter()
    for _ in range(10000):
        pause_point("batch")
    assert time.perf_counter() - t < 1.0
    monkeypatch.setenv("FRACFEAT_PAUSE_AT", "commit:1")
    monkeypatch.setenv("FRACFEAT_PAUSE_FILE", str(tmp_path / "held"))
    pause_point("batch")  # another point: returns at once, creates nothing
    assert not (tmp_path / "held").exists()


def test_a_watcher_that_sees_the_pause_file_reads_the_held_pid(tmp_path, monkeypatch):
    """The file appears whole: a watcher polling for it (as tests/test_distributed.py's killer does) never reads
    it empty. Written in place, a tight poll read it empty in 53 of 300 holds."""
    import threading

    from fracfeat import _faults

    held = tmp_path / "held"
    monkeypatch.setenv("FRACFEAT_PAUSE_AT", "batch:1")
    monkeypatch.setenv("FRACFEAT_PAUSE_FILE", str(held))
    seen = []
    for _ in range(60):
        _faults.reset()
        holder = threading.Thread(target=_faults.pause_point, args=("batch",))
        holder.start()
        while not held.exists():
            pass
        seen.append(held.read_text())
        held.unlink()  # releases the hold
        holder.join(10)
    _faults.reset()
    assert all(f"pid={os.getpid()}" in text for text in seen), [t for t in seen if "pid=" not in t][:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


def test_a_hold_nobody_ends_goes_on_after_its_limit(tmp_path, monkeypatch, capfd):
    """A watcher that never comes (it gave up, or crashed) must not hang the run for ever: after
    FRACFEAT_PAUSE_MAX_S the run goes on, removes the file and says so."""
    import time

    from fracfeat import _faults

    monkeypatch.setenv("FRACFEAT_PAUSE_AT", "batch:1")
    monkeypatch.setenv("FRACFEAT_PAUSE_FILE", str(tmp_path / "held"))
    monkeypatch.setenv("FRACFEAT_PAUSE_MAX_S", "0.3")
    _faults.reset()
    started = time.monotonic()
    _faults.pause_point("batch")
    _faults.reset()
    assert 0.3 <= time.monotonic() - started < 5
    assert not (tmp_path / "held").exists()
    assert "held at batch for FRACFEAT_PAUSE_MAX_S" in capfd.readouterr().err
