"""verify() finds a single flipped byte on disk; a damaged version is refused with a clear error."""

from __future__ import annotations

import shutil

import h5py
import pytest

from children import SETTINGS, clean_images
from fracfeat import FeatureStore, StoreError, extract


@pytest.fixture(scope="module")
def clean_store(fracatlas, tmp_path_factory) -> FeatureStore:
    root = tmp_path_factory.mktemp("integrity") / "store"
    extract(clean_images(fracatlas, 12), store=root, **SETTINGS)
    return FeatureStore(root)


def damaged_copy(store: FeatureStore, tmp_path, dataset: str, where: str) -> FeatureStore:
    """A copy of the store with one byte of ``dataset``'s stored bytes flipped in v1's file."""
    root = tmp_path / f"copy-{dataset}-{where}"
    shutil.copytree(store.root, root)
    path = root / "versions" / "v000001.h5"
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.chunks:  # features: gzip-compressed chunks; flip a byte inside the first chunk's stored bytes
            info = ds.id.get_chunk_info(0)
            start, size = info.byte_offset, info.size
        else:  # small datasets are stored contiguously, uncompressed
            start, size = ds.id.get_offset(), ds.id.get_storage_size()
    offset = start + {"first": 0, "middle": size // 2, "last": size - 1}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    return FeatureStore(root)


def test_clean_store_verifies(clean_store):
    assert [r.ok for r in clean_store.verify()] == [True]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_verify_detects_one_flipped_byte_in_the_features(clean_store, tmp_path, where):
    """A flip inside a gzip chunk either breaks its zlib stream (adler32) or changes the decoded
    values (the sha256 in the version's attributes): verify reports the features dataset either way."""
    damaged = damaged_copy(clean_store, tmp_path, "features", where)
    (report,) = damaged.verify()
    assert not report.ok
    assert any("'features'" in p for p in report.problems), report.problems
    with pytest.raises(StoreError, match=r"v000001\.h5.*damaged.*verify"):
        damaged.open(1)
    assert clean_store.verify()[0].ok  # the original is untouched


def test_cli_verify_names_the_flipped_features(clean_store, tmp_path, python, subprocess_env):
    import subprocess

    damaged = damaged_copy(clean_store, tmp_path, "features", "middle")
    r = subprocess.run([python, "-m", "fracfeat", "store", "verify", str(damaged.root)], env=subprocess_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "v1  DAMAGED" in r.stdout and "features" in r.stdout


def test_verify_detects_one_flipped_byte_in_the_labels(clean_store, tmp_path):
    damaged = damaged_copy(clean_store, tmp_path, "labels", "middle")
    (report,) = damaged.verify()
    # the file's own checksum first (checked before HDF5 reads a byte), then what the damage touched
    assert report.problems[0] == "its bytes do not match the file's checksum (damaged on disk)"
    assert report.problems[1:] == ["dataset 'labels' does not match its checksum (damaged)"]


def test_verify_reports_a_version_file_cut_short(clean_store, tmp_path):
    root = tmp_path / "cut"
    shutil.copytree(clean_store.root, root)
    path = root / "versions" / "v000001.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (report,) = FeatureStore(root).verify()
    assert not report.ok and "do not match the file's checksum" in report.problems[0]
    with pytest.raises(StoreError, match=r"v000001\.h5 is damaged.*delete it"):
        FeatureStore(root).open("latest")


@pytest.mark.slow
def test_damaged_openvino_model_cache_is_rebuilt_not_used(fracatlas, tmp_path, monkeypatch, caplog):
    """The converted model cached outside the store feeds every new row: a damaged weights file there
    must be noticed and rebuilt, or wrong features enter the store under the right fingerprint."""
    pytest.importorskip("openvino")
    import numpy as np

    monkeypatch.setenv("FRACFEAT_CACHE_DIR", str(tmp_path / "cache"))
    images = clean_images(fracatlas, 4)
    settings = dict(SETTINGS, runtime="openvino", precision="float32")
    first = extract(images, store=tmp_path / "a", **settings)
    (weights_bin,) = (tmp_path / "cache" / "openvino").glob("*/model.bin")
    data = bytearray(weights_bin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_bin.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="fracfeat"):
        again = extract(images, store=tmp_path / "b", **settings)
    assert "ignoring unreadable OpenVINO cache" in caplog.text and "damaged" in caplog.text
    np.testing.assert_array_equal(again.X, first.X)
