"""Augmented views (flips, rotations, resized crops) as store entries, and fit(augment=) training on them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, manifest_rows
from fracfeat import ConfigError, DeepFeatures, FeatureStore, extract, fit
from fracfeat._config import resolve_extractor
from fracfeat._images import load_image, pixels_from_array
from fracfeat._views import check_view

KERAS = dict(TINY, runtime="keras", precision="float32")


@pytest.mark.parametrize("given, canonical", [
    (None, ""), ("", ""), ("none", ""), ("hflip", "hflip"), (" HFlip ", "hflip"), ("rot+10", "rot+10"),
    ("rot-7.5", "rot-7.5"), ("rot+10.0", "rot+10"), ("crop0.8", "crop0.8"), ("crop.85", "crop0.85"),
])
def test_view_names_are_canonical(given, canonical):
    assert check_view(given) == canonical


@pytest.mark.parametrize("given, match", [
    ("vflip", "not a view"), ("rot10", "not a view"), ("rot+90", "1 to 45"), ("crop0.3", "0.5 and 0.95"),
    ("crop1.0", "not a view"), (3, "view name"),
])
def test_bad_views_name_the_fix(given, match):
    with pytest.raises(ConfigError, match=match):
        check_view(given)


def test_views_stay_out_of_plain_fingerprints_and_apart_from_each_other():
    plain, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras")
    flipped, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", view="hflip")
    cropped, _ = resolve_extractor("vgg16", None, 32, "avg", "float32", "keras", view="crop0.8")
    assert "view" not in plain.as_dict() and flipped.as_dict()["view"] == "hflip"
    assert len({plain.fingerprint, flipped.fingerprint, cropped.fingerprint}) == 3
    assert {k: v for k, v in flipped.as_dict().items() if k != "view"} == plain.as_dict()


def test_hflip_mirrors_a_real_radiograph(real_images):
    path = str(real_images["fractured"][0])
    plain, flipped = load_image(path, 224).pixels, load_image(path, 224, view="hflip").pixels
    # Mirroring then resizing equals resizing then mirroring, up to rounding of the bilinear filter.
    assert np.abs(flipped.astype(int) - plain[:, ::-1].astype(int)).max() <= 1
    assert np.abs(flipped.astype(int) - plain.astype(int)).mean() > 5  # and it is not the image itself


def test_crop_is_decoded_at_full_detail(real_images):
    path = str(real_images["fractured"][1])
    cropped = load_image(path, 224, view="crop0.5").pixels
    with Image.open(path) as img:
        full = img.convert("RGB")
        w, h = full.size
        by_hand = full.crop(((w - round(w * .5)) // 2, (h - round(h * .5)) // 2,
                             (w - round(w * .5)) // 2 + round(w * .5), (h - round(h * .5)) // 2 + round(h * .5)))
        by_hand = np.asarray(by_hand.resize((224, 224), Image.Resampling.BILINEAR))
    # JPEG draft decoding at >= 448 px then cropping stays close to cropping the full-size image.
    assert np.abs(cropped.astype(float) - by_hand).mean() < 3
    # An image in memory gets the same view as its file.
    assert np.abs(pixels_from_array(np.asarray(full), 224, "crop0.5").astype(float) - by_hand).mean() < 1


def test_rotation_turns_the_image_and_fills_corners_black(real_images):
    path = str(real_images["not_fractured"][0])
    plain, turned = load_image(path, 224).pixels, load_image(path, 224, view="rot+20").pixels
    assert turned.shape == plain.shape and turned[0, 0].max() == 0 and turned[-1, -1].max() == 0
    back = np.asarray(Image.fromarray(plain).rotate(20, resample=Image.Resampling.BILINEAR))
    assert np.abs(turned[60:164, 60:164].astype(float) - back[60:164, 60:164]).mean() < 8


def test_a_view_is_its_own_store_entry_and_the_pipeline_reproduces_it(tmp_path, real_images):
    images = [str(p) for p in real_images["fractured"][:3] + real_images["not_fractured"][:3]]
    store = tmp_path / "s"
    plain = extract(images, store=store, **KERAS)
    flipped = extract(images, store=store, view="hflip", **KERAS)
    assert flipped.version == plain.version + 1 and flipped.provenance["view"] == "hflip"
    assert "view" not in plain.provenance and flipped.fingerprint != plain.fingerprint
    assert list(flipped.ids) == list(plain.ids)  # same images, same ids: a view row finds its original
    assert not np.allclose(flipped.X, plain.X)
    again = extract(images, store=store, view="hflip", **KERAS)
    assert again.version == flipped.version and again.provenance["n_computed"] == 0  # cached per view
    deep = DeepFeatures.from_provenance(flipped.provenance)
    assert deep.view == "hflip"
    np.testing.assert_allclose(deep.transform(images), flipped.X, rtol=1e-5, atol=1e-6)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images[:2]]
    # In-memory images go through the same view (the draft-mode JPEG decode differs slightly).
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(deep.transform(arrays), flipped.X)]
    assert min(cos) > 0.99


@pytest.fixture(scope="module")
def with_views(tmp_path_factory, fracatlas):
    """48 labeled real radiographs (with groups) and their hflip and crop0.8 views, in one store."""
    rows = [r for r in manifest_rows() if r["use"] == "1"]
    picked = [r for r in rows if r["label"] == "fractured"][:24] + [r for r in rows if r["label"] == "not_fractured"][:24]
    kwargs = dict(labels=[r["label"] for r in picked], groups=[r["group"] for r in picked], **TINY)
    store = tmp_path_factory.mktemp("views") / "store"
    paths = [fracatlas / r["path"] for r in picked]
    return {view: extract(paths, store=store, view=view, **kwargs) for view in ("", "hflip", "crop0.8")}


def test_fit_trains_on_views_and_validates_on_originals(with_views):
    fs = with_views[""]
    plain = fit(fs, classifier="logreg", n_trials=2, cv=3)
    res = fit(fs, classifier="logreg", n_trials=2, cv=3, augment=[with_views["hflip"], with_views["crop0.8"]])
    assert res.augment == ("hflip", "crop0.8") and res.n_train == 3 * len(fs) and plain.n_train == len(fs)
    assert res.study.user_attrs["fracfeat"]["augment"] == "hflip,crop0.8"  # a resumed study must match
    assert res.cv_score != plain.cv_score
    scaler = res.pipeline[1]  # the kept model saw every row and its two views
    assert scaler.n_features_in_ == fs.n_features and scaler.n_samples_seen_ == 3 * len(fs)
    # The kept Pipeline reads the original images: its feature step has no view.
    assert res.pipeline[0].view is None and res.pipeline[0].fingerprint_ == fs.fingerprint
    # A store directory whose latest version is the view works as well as the FeatureSet.
    again = fit(fs, classifier="logreg", n_trials=2, cv=3, augment=with_views["crop0.8"].store)
    assert again.n_train == 2 * len(fs) and again.augment == ("crop0.8",)
    once = fit(fs, classifier="logreg", n_trials=1, cv=3, augment=FeatureStore(with_views["crop0.8"].store))
    assert once.augment == ("crop0.8",)


def test_bad_augment_says_what_to_extract(with_views, tmp_path, fracatlas):
    fs = with_views[""]
    with pytest.raises(ConfigError, match="not an augmented view"):
        fit(fs, classifier="logreg", n_trials=1, cv=3, augment=[fs])
    with pytest.raises(ConfigError, match="given twice"):
        fit(fs, classifier="logreg", n_trials=1, cv=3, augment=[with_views["hflip"], with_views["hflip"]])
    fewer = with_views["hflip"].subset(np.arange(40))
    with pytest.raises(ConfigError, match="lacks 8 of the 48 training images"):
        fit(fs, classifier="logreg", n_trials=1, cv=3, augment=[fewer])
    paths = [str(p) for p in fs.paths]
    other = extract(paths, store=tmp_path / "s", view="hflip", pooling="max", labels=list(fs.y),
                    groups=list(fs.groups), **TINY)
    with pytest.raises(ConfigError, match="pooling differ"):
        fit(fs, classifier="logreg", n_trials=1, cv=3, augment=[other])


def test_out_of_fold_averages_views_at_test_time(with_views):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import FixedThresholdClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fracfeat._validation import grouped_folds, out_of_fold

    fs, views = with_views[""], [with_views["hflip"].X, with_views["crop0.8"].X]
    folds = grouped_folds(fs.y, fs.groups, n_splits=3, seed=0)
    models = []

    def fit_fold(train):
        clf = FixedThresholdClassifier(LogisticRegression(max_iter=500), threshold=0.3, response_method="predict_proba")
        models.append(make_pipeline(StandardScaler(), clf).fit(train.X, train.y))
        return models[-1]

    oof = out_of_fold(fs, fit_fold, folds, tta_views=views)
    for model, (_, te) in zip(models, folds):
        by_hand = np.mean([model.predict_proba(x[te])[:, 1] for x in (fs.X, *views)], axis=0)
        np.testing.assert_allclose(oof.score_tta[te], by_hand, rtol=1e-6)
        # The averaged score is decided at the fold model's own threshold (0.3 here, not 0.5).
        np.testing.assert_array_equal(oof.pred_tta[te], by_hand >= 0.3)
    assert not np.allclose(oof.score_tta, oof.score)
    with pytest.raises(ConfigError, match="tta_views"):
        out_of_fold(fs, fit_fold, folds, tta_views=[fs.X[:10]])
    assert out_of_fold(fs, fit_fold, folds).score_tta is None
