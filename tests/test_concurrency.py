"""Concurrent use of one store: writers queue on the lock (or fail clearly), readers see only complete versions."""

from __future__ import annotations

import time

import numpy as np
import pytest

from children import SETTINGS, clean_images, start_child
from fracfeat import FeatureStore, StoreError, extract


def wait_for_text(child, text: str, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while text not in child.log():
        assert child.proc.poll() is None, f"child exited before logging {text!r}:\n{child.log()}"
        assert time.monotonic() < deadline, f"child did not log {text!r} within {timeout}s:\n{child.log()}"
        time.sleep(0.05)


def assert_only_complete_versions(store: FeatureStore, expected: list[int]) -> None:
    assert [v.version for v in store.versions()] == expected
    assert store.open("latest").version == expected[-1]
    assert all(r.ok for r in store.verify()), [r.problems for r in store.verify()]


@pytest.mark.slow
def test_two_writers_queue_a_third_times_out_and_readers_see_complete_versions(fracatlas, tmp_path):
    images = clean_images(fracatlas, 24)
    store = FeatureStore(tmp_path / "store")
    extract(images[:8], store=store.root, **SETTINGS)  # v1

    # Writer A holds the lock, its version complete in tmp/ but not yet renamed into versions/.
    a = start_child(tmp_path / "children", "a", images, store.root, pause_at="commit:1")
    b = None
    try:
        a.wait_held()
        # Writer B waits for A (it logs that it waits) ...
        b = start_child(tmp_path / "children", "b", images[4:], store.root, lock_timeout=300)
        wait_for_text(b, "is being written by another process; waiting")
        # ... a writer with a short timeout gives up with a message naming the store and the fix ...
        with pytest.raises(StoreError, match=r"locked by another writer.*Wait for it to finish, or use another store="):
            extract(images[:2], store=store.root, lock_timeout=0.5, **SETTINGS)
        # ... and a reader sees v1 only: A's finished-but-uncommitted file is invisible.
        assert_only_complete_versions(store, [1])

        a.release()
        result_a, result_b = a.result(), b.result()
    finally:
        a.kill()
        if b is not None:
            b.kill()
    assert (result_a["version"], result_b["version"]) == (2, 3)
    assert result_b["n_computed"] == 0  # B waited, then found all its rows in A's version
    assert_only_complete_versions(store, [1, 2, 3])
    v2, v3 = store.open(2), store.open(3)
    np.testing.assert_array_equal(v3.X, v2.X[4:])


def test_store_left_half_created_by_a_killed_process_is_usable(fracatlas, tmp_path):
    """A process killed while FeatureStore.writer() creates the layout leaves its folders without the marker file."""
    root = tmp_path / "store"
    for d in ("versions", "tmp", "checkpoints"):
        (root / d).mkdir(parents=True)
    (root / ".lock").touch()
    fs = extract(clean_images(fracatlas, 2), store=root, **SETTINGS)
    assert fs.version == 1 and FeatureStore(root).verify()[0].ok


def test_foreign_directory_is_refused_as_store(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.txt").write_text("not a store")
    with pytest.raises(StoreError, match="is not a fracfeat store; choose an empty or new directory"):
        extract([str(tmp_path / "photos" / "holiday.txt")], store=tmp_path / "photos", **SETTINGS)
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["holiday.txt"]  # left as it was


def test_file_changed_after_hashing_is_not_stored_under_its_old_hash(fracatlas, tmp_path):
    """Files are hashed before the writer lock is taken and decoded after: a file rewritten in between
    (a sync or copy still running) must not put the new image's features under the old bytes' hash,
    where every later run would reuse them."""
    import logging
    import shutil
    import threading

    images = clean_images(fracatlas, 4)
    folder = tmp_path / "images"
    folder.mkdir()
    for p in images[:2]:
        shutil.copy(p, folder)
    changing = folder / "changing.jpg"
    shutil.copy(images[3], changing)  # hashed as a copy of images[3] ...
    store = FeatureStore(tmp_path / "store")

    waiting = threading.Event()

    class WaitSeen(logging.Handler):
        def emit(self, record):
            if "waiting" in record.getMessage():
                waiting.set()

    handler = WaitSeen()
    logging.getLogger("fracfeat").addHandler(handler)
    old_level = logging.getLogger("fracfeat").level
    logging.getLogger("fracfeat").setLevel(logging.INFO)
    result = {}
    try:
        with FeatureStore(store.root).writer():  # another writer holds the store
            worker = threading.Thread(target=lambda: result.update(fs=extract(folder, store=store.root, **SETTINGS)))
            worker.start()
            assert waiting.wait(120), "extract never waited for the lock"
            shutil.copy(images[2], changing)  # ... and rewritten before it is decoded
        worker.join(300)
    finally:
        logging.getLogger("fracfeat").removeHandler(handler)
        logging.getLogger("fracfeat").setLevel(old_level)
    fs = result["fs"]
    assert [f["path"] for f in fs.failures] == [str(changing)]
    assert fs.failures[0]["reason"].startswith("changed while extracting: ")
    # The bug this guards against: images[3]'s hash holding images[2]'s features.
    assert extract([images[3]], store=store.root, **SETTINGS).provenance["n_computed"] == 1
    # A clean re-run sees the new bytes under their own hash.
    again = extract(folder, store=store.root, **SETTINGS)
    assert not again.failures and len(again) == 3
    ref = extract([images[2]], store=tmp_path / "ref", **SETTINGS)
    np.testing.assert_array_equal(again.X[list(again.paths).index(str(changing))], ref.X[0])


@pytest.mark.slow
def test_two_writers_started_together_on_a_new_store(fracatlas, tmp_path):
    """No hook: two real processes race to create and fill one new store; both succeed, nothing is corrupt."""
    images = clean_images(fracatlas, 16)
    root = tmp_path / "store"
    children = [start_child(tmp_path / "children", name, images, root, lock_timeout=300) for name in ("x", "y")]
    try:
        results = [c.result() for c in children]
    finally:
        for c in children:
            c.kill()
    # One computed and committed v1; the other waited (or came second), found every row and the same
    # content, and returned v1 rather than writing a copy.
    assert [r["version"] for r in results] == [1, 1]
    store = FeatureStore(root)
    assert_only_complete_versions(store, [1])
    assert len(store.open(1)) == 16


@pytest.mark.slow
def test_two_extractions_compute_side_by_side_and_queue_only_their_commits(fracatlas, tmp_path):
    """The writer lock is held only to save a checkpoint and to commit: an extraction held while computing
    (in a real child process) blocks no one; a second one computes and commits meanwhile, then the first
    commits too, its rows and the second's each once."""
    images = clean_images(fracatlas, 16)
    store = FeatureStore(tmp_path / "store")
    # A is held at its 3rd batch of 4: its first 8 rows are in a checkpoint, the lock is not held.
    a = start_child(tmp_path / "children", "a", images[:12], store.root, pause_at="batch:3")
    b = None
    try:
        a.wait_held()
        with store.writer(lock_timeout=0):  # A computes without the lock
            pass
        b = start_child(tmp_path / "children", "b", images[4:], store.root, lock_timeout=5)
        result_b = b.result()  # B finished while A is still held
        assert a.proc.poll() is None
        a.release()
        result_a = a.result()
    finally:
        a.kill()
        if b is not None:
            b.kill()
    assert (result_b["version"], result_a["version"]) == (1, 2)
    assert (result_b["n_computed"], result_b["n_reused"]) == (8, 4)  # images 4-7 from A's checkpoint
    assert (result_a["n_computed"], result_a["n_reused"]) == (12, 0)
    assert_only_complete_versions(store, [1, 2])
    assert not list((store.root / "checkpoints").rglob("*.h5"))  # each run's checkpoints folded in and removed
    v1, v2 = store.open(1), store.open(2)
    assert len(set(v1.ids)) == 12 and len(set(v2.ids)) == 12
    np.testing.assert_array_equal(v1.X[:8], v2.X[4:])
