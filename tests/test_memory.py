"""Extraction streams: the returned FeatureSet reads its matrix from the store only when asked."""

from __future__ import annotations

import pickle

import numpy as np

from conftest import TINY
from fracfeat import FeatureStore, extract


def test_extract_returns_rows_on_disk_until_X_is_read(class_folder, tmp_path):
    fs = extract(class_folder, store=tmp_path / "store", **TINY)
    assert fs._X is None  # nothing held yet
    assert fs.n_features == 512 and len(fs) == 12 and "12 images x 512 features" in repr(fs)
    assert fs._X is None  # the shape comes from the file, not from loading it
    eager = FeatureStore(tmp_path / "store").open(fs.version)
    np.testing.assert_array_equal(fs.X, eager.X)
    assert fs.X.dtype == np.float32 and fs.X.shape == (12, 512)
    np.testing.assert_array_equal(fs.subset(np.arange(3)).X, eager.X[:3])


def test_a_lazy_feature_set_pickles_without_its_matrix(class_folder, tmp_path):
    fs = extract(class_folder, store=tmp_path / "store", **TINY)
    again = pickle.loads(pickle.dumps(fs))
    assert again._X is None
    np.testing.assert_array_equal(again.X, FeatureStore(tmp_path / "store").open(fs.version).X)
