"""Extraction on a real Dask cluster (a LocalCluster of 2 worker processes, 1 thread each): the rows equal a
local run's, a worker killed mid-run loses nothing and duplicates nothing, the CLI takes --scheduler."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from children import clean_images
from fracfeat import ExtractorSettings, FeatureStore, extract
from fracfeat._distributed import distributed_batches

SETTINGS = dict(backbone="vgg16", weights=None, image_size=32, progress=False, batch_size=2, checkpoint_every=4)


@pytest.fixture(scope="module")
def client():
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        if os.environ.get("FRACFEAT_REQUIRE_SERVERS") == "1":
            pytest.fail("FRACFEAT_REQUIRE_SERVERS=1 but dask.distributed is not installed (pip install 'fracfeat[dask]')")
        pytest.skip("dask.distributed is not installed (pip install 'fracfeat[dask]')")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def images(fracatlas) -> list[str]:
    return clean_images(fracatlas, 8)


@pytest.fixture(scope="module")
def local(images, tmp_path_factory):
    """The same rows computed in this process, without a cluster."""
    return extract(images, store=tmp_path_factory.mktemp("local") / "store", **SETTINGS)


def test_rows_equal_a_local_runs_and_progress_shows_the_clusters_rate(client, images, local, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fracfeat"):
        fs = extract(images, store=tmp_path / "store", client=client, **SETTINGS)
    assert fs.fingerprint == local.fingerprint and list(fs.ids) == list(local.ids)
    np.testing.assert_allclose(fs.X, local.X, rtol=0, atol=1e-6)
    assert fs.provenance["n_computed"] == 8 and fs.provenance["keras_version"] == local.provenance["keras_version"]
    assert any("2 workers" in r.getMessage() and "image paths" in r.getMessage() for r in caplog.records)
    assert any("images/s" in r.getMessage() for r in caplog.records)
    again = extract(images, store=tmp_path / "store", client=client, **SETTINGS)
    assert again.version == fs.version and again.provenance["n_computed"] == 0  # the cache works as locally


def test_workers_without_the_files_get_their_bytes(client, images, local):
    """Where workers see no shared filesystem, this process sends the files' bytes: the same rows."""
    config, weights = ExtractorSettings.from_kwargs("extract", backbone="vgg16", image_size=32).resolve(None)
    ids = list(local.ids)
    rows = np.empty((8, local.n_features), np.float32)
    with distributed_batches(client, config, weights, images, ids, batch_size=3, strict=False, send="bytes") as run:
        assert run.send == "bytes"
        for batch in run.batches():
            rows[batch.indices] = batch.features
    np.testing.assert_allclose(rows, local.X, rtol=0, atol=1e-6)


def test_cli_extract_on_a_scheduler(client, images, local, tmp_path, python, subprocess_env):
    """`fracfeat extract --scheduler ADDRESS` in a real process; it never needs the backbone itself."""
    store = tmp_path / "store"
    manifest = tmp_path / "images.csv"
    manifest.write_text("path\n" + "\n".join(images) + "\n")
    out = subprocess.run([python, "-m", "fracfeat", "extract", str(manifest), "--store", str(store), "--backbone",
                          "vgg16", "--image-size", "32", "--weights", "none", "--batch-size", "2", "--quiet",
                          "--scheduler", client.scheduler.address], env=subprocess_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "8 computed" in out.stdout
    np.testing.assert_allclose(FeatureStore(store).open().X, local.X, rtol=0, atol=1e-6)


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(client, images, local, tmp_path):
    """One worker is held inside its first chunk (the test hook of fracfeat/_faults.py) and SIGKILLed there:
    the scheduler runs its chunk elsewhere, and the version holds each image once, equal to a local run."""
    victim = sorted(client.nthreads())[0]
    held = tmp_path / "held"
    # exec, a builtin, travels by name (a bound os.environ method would carry a copy of this process's environ).
    # FRACFEAT_PAUSE_MAX_S: should the killer miss the hold, the worker goes on and the test fails, not hangs.
    client.run(exec, "import os; os.environ.update(FRACFEAT_PAUSE_AT='worker_chunk:1', FRACFEAT_PAUSE_MAX_S='180', "
               f"FRACFEAT_PAUSE_FILE={str(held)!r})", workers=[victim])
    killed = []

    def kill_when_held():
        deadline = time.monotonic() + 120
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if held.exists():
            pid = int(held.read_text().split("pid=")[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_held)
    killer.start()
    try:
        fs = extract(images, store=tmp_path / "store", client=client, **SETTINGS)
    finally:
        killer.join(130)
        client.run(exec, "import os; os.environ.pop('FRACFEAT_PAUSE_AT', None)")
    assert killed, "the held worker was never reached"
    assert sorted(fs.ids) == sorted(local.ids) and len(set(fs.ids)) == 8
    np.testing.assert_allclose(fs.X, local.X, rtol=0, atol=1e-6)
    assert fs.provenance["n_computed"] == 8
    assert FeatureStore(tmp_path / "store").verify()[0].ok
