"""How run() holds images out: the source's test split, else a stratified hold-out that respects groups."""

from __future__ import annotations

import numpy as np
import pytest

from fracfeat import ConfigError, FeatureSet
from fracfeat._run import HOLDOUT, holdout_split


def feature_set(n=200, groups=True, splits=None, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.int64)
    g = np.array([f"g{i // 3}" for i in range(n)], dtype=object) if groups else np.array([""] * n, dtype=object)
    s = np.array(splits if splits is not None else [""] * n, dtype=object)
    return FeatureSet(X=rng.random((n, 4)).astype(np.float32), y=y, ids=np.array([f"{i:064x}" for i in range(n)]),
                      paths=np.array([f"/img/{i}.jpg" for i in range(n)], dtype=object), groups=g, splits=s,
                      class_names=np.where(y == 1, "fractured", "not_fractured").astype(object))


def test_grouped_holdout_keeps_groups_whole_and_is_stratified():
    fs = feature_set()
    train, held, how, grouped = holdout_split(fs, 0.2, seed=0)
    assert grouped and "grouped" in how
    assert len(train) + len(held) == len(fs)
    assert not set(train.groups) & set(held.groups)
    assert 0.15 < len(held) / len(fs) < 0.25
    assert abs(held.y.mean() - fs.y.mean()) < 0.08
    assert set(held.splits) == {HOLDOUT}
    # seeded: the same images every time
    assert list(holdout_split(fs, 0.2, seed=0)[1].ids) == list(held.ids)


def test_without_groups_the_holdout_says_so():
    _, held, how, grouped = holdout_split(feature_set(groups=False), 0.25)
    assert not grouped and "not grouped" in how
    assert 0.2 < len(held) / 200 < 0.3


def test_the_sources_test_split_is_the_holdout():
    splits = ["train"] * 120 + ["val"] * 40 + ["test"] * 40
    train, held, how, _ = holdout_split(feature_set(splits=splits), 0.2)
    assert "test split" in how and len(held) == 40 and set(held.splits) == {"test"}
    assert set(train.splits) == {"train", "val"}


def test_bad_test_size_and_too_few_images():
    with pytest.raises(ConfigError, match="test_size"):
        holdout_split(feature_set(), 1.5)
    with pytest.raises(ConfigError, match="at least 5 images of each class"):
        holdout_split(feature_set(n=12), 0.2)


@pytest.mark.slow
def test_run_trains_on_augmented_views_of_the_training_images_only(tmp_path, class_folder):
    from conftest import TINY
    from fracfeat import FeatureStore, run

    tiny = {k: v for k, v in TINY.items() if k != "progress"}
    result = run(class_folder, tmp_path / "out", augment="hflip", classifier="logreg", n_trials=2, cv=2,
                 progress=False, **tiny)
    n_train = len(result.features) - result.metrics["held-out"]["n"]
    assert result.fit.augment == ("hflip",) and result.fit.n_train == 2 * n_train
    listed = [v.describe() for v in FeatureStore(tmp_path / "out" / "store").versions()]
    assert len(listed) == 2 and "view=hflip" in listed[1]
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "augmented views" in page and "hflip" in page
    assert result.fit.pipeline[0].view is None  # the saved model reads the images themselves
    with pytest.raises(ConfigError, match="not a view"):
        run(class_folder, tmp_path / "out2", augment=("vflip",), progress=False, **tiny)
    with pytest.raises(ConfigError, match="augment="):
        run(class_folder, tmp_path / "out3", view="hflip", progress=False, **tiny)
