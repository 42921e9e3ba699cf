"""explain(): heatmaps of fitted Pipelines, checked the way the saliency literature checks them (Adebayo et
al., 2018) on real radiographs: a planted mark the classifier keys on gets the peak, randomized head weights
change the maps, the exact maps agree with occlusion; plus the exactness of each method, the fallbacks, the
CLI and the report's grid."""

from __future__ import annotations

import copy
import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from fracfeat import ConfigError, ImageError, explain, save_model
from fracfeat._explain import channel_weights, explain_method, log_odds

SIZE = 224  # VGG16's 7 x 7 final map: at 128 px (4 x 4) the peak missed a planted mark by up to 2 cells
SIDE = 448  # the radiographs are explained at this size (the mark's boxes are in its pixels)
MARK = 0.2  # the mark's side, as a fraction of the image's
SPOTS = ((0.3, 0.3), (0.7, 0.7), (0.3, 0.7), (0.7, 0.3))  # centres of the test images' marks (y, x)


def _marked(image: np.ndarray, cy: float, cx: float):
    """The image with a bright mark (a white and black checkered square of side MARK, 4 x 4 squares) centred
    at (cy, cx); and its box (y0, y1, x0, x1). A plain white square looks like bone to VGG16: trained on it,
    the classifier gave one marked test image P = 0.001."""
    out = image.copy()
    h, w = out.shape[:2]
    sh, sw = int(h * MARK), int(w * MARK)
    y0, x0 = int(cy * h - sh / 2), int(cx * w - sw / 2)
    yy, xx = np.mgrid[0:sh, 0:sw]
    out[y0:y0 + sh, x0:x0 + sw] = (((yy // (sh // 4) + xx // (sw // 4)) % 2) * 255)[..., None]
    return out, (y0, y0 + sh, x0, x0 + sw)


@pytest.fixture(scope="module")
def marked(real_images, vgg16_weights):
    """A VGG16 feature step (real weights) and a training set in which a bright mark anywhere means label 1.

    8 real radiographs, each once as it is (label 0) and once with the mark at a random place (label 1);
    4 other radiographs with the mark at a known place are the test images.
    """
    from fracfeat import DeepFeatures

    images = [np.asarray(Image.open(p).convert("RGB").resize((SIDE, SIDE))) for p in
              real_images["fractured"][:6] + real_images["not_fractured"][:6]]
    train, test = images[:4] + images[6:10], images[4:6] + images[10:12]
    rng = np.random.default_rng(0)
    X, y = [], []
    for image in train:
        X.append(image)
        y.append(0)
        X.append(_marked(image, *rng.uniform(0.2, 0.8, size=2))[0])
        y.append(1)
    tests, boxes = zip(*(_marked(image, *spot) for image, spot in zip(test, SPOTS)))
    deep = DeepFeatures("vgg16", weights=str(vgg16_weights), image_size=SIZE, precision="float32",
                        runtime="keras").fit()
    return dict(deep=deep, X=X, F=deep.transform(X), y=np.array(y), tests=list(tests), boxes=list(boxes),
                F_tests=deep.transform(list(tests)))


def _pipeline(deep, *head):
    from sklearn.pipeline import Pipeline

    return Pipeline([("features", deep), *head])


@pytest.fixture(scope="module")
def logreg(marked):
    """scaler + PCA + logistic regression, the steps fit makes for the logreg family."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    pipe = _pipeline(marked["deep"], ("scale", StandardScaler()), ("reduce", PCA(0.95, random_state=0)),
                     ("classifier", LogisticRegression(C=0.1, max_iter=2000)))
    pipe[1:].fit(marked["F"], marked["y"])
    return pipe


@pytest.fixture(scope="module")
def logreg_maps(logreg, marked):
    return explain(logreg, marked["tests"])


def _peak_on(heat: np.ndarray, box) -> bool:
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    return box[0] <= y < box[1] and box[2] <= x < box[3]


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel()[::7], b.ravel()[::7])[0])


def test_the_peak_falls_on_the_mark_the_classifier_keys_on(logreg, logreg_maps, marked):
    assert explain_method(logreg) == ("cam", "")
    assert (logreg.predict_proba(marked["tests"])[:, 1] > 0.5).all()  # it did learn the mark
    for heat, box in zip(logreg_maps, marked["boxes"]):
        assert heat.shape == (SIDE, SIDE) and heat.dtype == np.float32
        assert _peak_on(heat, box), (np.unravel_index(np.argmax(heat), heat.shape), box)


def test_the_class_activation_map_is_exact(logreg, logreg_maps, marked):
    """Scaler and PCA folded into the weights: the map's mean is the log-odds less those of zero features."""
    z = log_odds(logreg[1:], marked["F_tests"])
    zero = log_odds(logreg[1:], np.zeros((1, marked["F"].shape[1])))
    means = np.array([heat.mean() for heat in logreg_maps])
    np.testing.assert_allclose(means + zero, z, rtol=1e-3, atol=1e-2)


def test_randomized_head_weights_change_the_maps(logreg, logreg_maps, marked):
    """Adebayo et al.'s model randomization test: a map that survives it does not explain the model."""
    shuffled = copy.deepcopy(logreg)
    clf = shuffled.named_steps["classifier"]
    clf.coef_ = np.random.default_rng(1).standard_normal(clf.coef_.shape) * np.abs(clf.coef_).mean()
    random_maps = explain(shuffled, marked["tests"])
    rhos = [_rank_correlation(a, b) for a, b in zip(logreg_maps, random_maps)]
    print(f"rank correlation, trained vs randomized head: {np.round(rhos, 2).tolist()}")
    assert max(rhos) < 0.5  # measured: -0.55, -0.40, -0.11, 0.15


def test_the_exact_map_and_occlusion_agree(logreg, logreg_maps, marked):
    occluded = explain(logreg, marked["tests"][:1], method="occlusion", grid=4)
    rhos = [_rank_correlation(a, b) for a, b in zip(logreg_maps, occluded)]
    print(f"rank correlation, class activation map vs occlusion (4 x 4 patches): {np.round(rhos, 2).tolist()}")
    assert min(rhos) > 0.5  # measured 0.73 (0.48 on the second test image)


def test_the_svm_gradient_is_its_decision_functions(marked):
    """Analytic gradient through scaler, PCA and the Platt sigmoid = finite differences of the log-odds."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from fracfeat._calibration import SigmoidCalibrated

    svm = SigmoidCalibrated(SVC(C=1.0, gamma=0.5 / 512), cv=3, random_state=0)
    pipe = _pipeline(marked["deep"], ("scale", StandardScaler()), ("reduce", PCA(0.95, random_state=0)),
                     ("classifier", svm))
    pipe[1:].fit(marked["F"], marked["y"])
    from fracfeat._explain import head_plan

    plan = head_plan(pipe[1:])
    assert plan.method == "gradient"
    f = marked["F_tests"][:1].astype(np.float64)
    g = channel_weights(plan, f)[0]
    eps = 1e-3 * np.abs(f).max()
    top = np.argsort(-np.abs(g))[:5]
    for k in top:
        up, down = f.copy(), f.copy()
        up[0, k] += eps
        down[0, k] -= eps
        numeric = (log_odds(pipe[1:], up) - log_odds(pipe[1:], down))[0] / (2 * eps)
        assert numeric == pytest.approx(g[k], rel=2e-2, abs=1e-6)
    maps = explain(pipe, marked["tests"])
    assert sum(_peak_on(heat, box) for heat, box in zip(maps, marked["boxes"])) >= 3


def test_xgboost_contributions_add_up_to_its_margin(marked):
    xgb = pytest.importorskip("xgboost")
    clf = xgb.XGBClassifier(n_estimators=30, max_depth=2, learning_rate=0.3, n_jobs=1, random_state=0)
    pipe = _pipeline(marked["deep"], ("scale", "passthrough"), ("reduce", "passthrough"), ("classifier", clf))
    pipe[1:].fit(marked["F"], marked["y"])
    assert explain_method(pipe)[0] == "contributions"
    maps = explain(pipe, marked["tests"])
    bias = clf.get_booster().predict(xgb.DMatrix(marked["F_tests"]), pred_contribs=True)[:, -1]
    margin = clf.predict(marked["F_tests"], output_margin=True)
    np.testing.assert_allclose([heat.mean() for heat in maps], margin - bias, rtol=1e-3, atol=1e-3)


def test_multi_layer_and_joined_features_split_back_exactly(real_images):
    """Tapped layers and joined parts: each map from its own layer, summed; still exact."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from fracfeat import DeepFeatures
    from fracfeat._transformer import JoinedFeatures

    paths = real_images["fractured"][:3] + real_images["not_fractured"][:3]
    taps = DeepFeatures("vgg16", weights=None, image_size=64, layers=("block3_pool",), precision="float32",
                        runtime="keras").fit()
    scaled = DeepFeatures("vgg16", weights=None, image_size=32, scales=(32, 64), precision="float32",
                          runtime="keras").fit()
    deep = JoinedFeatures([("part1", taps), ("part2", scaled)])
    F = deep.transform(paths)
    pipe = _pipeline(deep, ("scale", StandardScaler()), ("classifier", LogisticRegression(C=0.01, max_iter=2000)))
    pipe[1:].fit(F, [1, 1, 1, 0, 0, 0])
    assert explain_method(pipe) == ("cam", "")
    maps = explain(pipe, paths[:2])
    for heat, path in zip(maps, paths):
        with Image.open(path) as img:
            assert heat.shape == (img.height, img.width)  # the file's own pixel size
    decision = pipe[1:].decision_function(np.vstack([F[:2], np.zeros((1, F.shape[1]))]))
    np.testing.assert_allclose([heat.mean() for heat in maps], decision[:2] - decision[2], rtol=1e-3, atol=1e-3)


def test_tiled_features_split_back_exactly_and_agree_with_occlusion(marked, vgg16_weights):
    """2 x 2 tiles of 128 px with a tapped layer, real weights, on the planted-mark images. Each tile's maps go
    to its place; the mean-over-tiles half weighs every tile, the max-over-tiles half the tile holding each
    channel's max. That sum is exact (the max is that tile's value): the map's mean is the log-odds less those
    of zero features, and XGBoost's margin less its bias. Not the peak test: at 128 px occlusion's own peak
    missed all 4 marks (at 224 px the tiled map hit 4 of 4, occlusion 0 of 4, but that costs a minute)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from fracfeat import DeepFeatures

    deep = DeepFeatures("vgg16", weights=str(vgg16_weights), image_size=128, tiles=2, layers=("block4_pool",),
                        precision="float32", runtime="keras").fit()
    pipe = _pipeline(deep, ("scale", StandardScaler()), ("reduce", PCA(0.95, random_state=0)),
                     ("classifier", LogisticRegression(C=0.1, max_iter=2000)))
    F = deep.transform(marked["X"] + marked["tests"])
    pipe[1:].fit(F[:-4], marked["y"])
    assert explain_method(pipe) == ("cam", "")
    maps = explain(pipe, marked["tests"])
    zero = log_odds(pipe[1:], np.zeros((1, F.shape[1])))
    np.testing.assert_allclose([heat.mean() for heat in maps] + zero, log_odds(pipe[1:], F[-4:]), rtol=1e-3, atol=1e-2)
    occluded = explain(pipe, marked["tests"], method="occlusion", grid=3)
    rhos = [_rank_correlation(a, b) for a, b in zip(maps, occluded)]
    print(f"tiles=2: rank correlation with occlusion (3 x 3 patches): {np.round(rhos, 2).tolist()}")
    xgb = pytest.importorskip("xgboost")
    clf = xgb.XGBClassifier(n_estimators=10, max_depth=2, n_jobs=1, random_state=0)
    trees = _pipeline(deep, ("scale", "passthrough"), ("classifier", clf))
    trees[1:].fit(F[:-4], marked["y"])
    contributions = explain(trees, marked["tests"][:2])
    bias = clf.get_booster().predict(xgb.DMatrix(F[-4:-2]), pred_contribs=True)[:, -1]
    np.testing.assert_allclose([heat.mean() for heat in contributions],
                               clf.predict(F[-4:-2], output_margin=True) - bias, rtol=1e-3, atol=1e-3)
    assert np.mean(rhos) > 0.45  # measured 0.60, 0.50, 0.60, 0.70


def test_settings_without_an_exact_map_get_occlusion(marked, logreg):
    from fracfeat import DeepFeatures

    for settings, reason in ((dict(view="hflip"), "view='hflip'"), (dict(pooling="max"), "pooling='max'")):
        deep = DeepFeatures("vgg16", weights=None, image_size=32, **settings).fit()
        pipe = _pipeline(deep, *logreg.steps[1:])
        method, why = explain_method(pipe)
        assert method == "occlusion" and why.startswith(reason)
        with pytest.raises(ConfigError, match="no exact heatmap.*method='occlusion'"):
            explain(pipe, marked["tests"][:1], method="exact")


def test_user_errors_are_one_clear_line(logreg, marked, tmp_path):
    with pytest.raises(ConfigError, match="single path.*wrap it in a list"):
        explain(logreg, "a.jpg")
    with pytest.raises(ConfigError, match="takes feature arrays"):
        explain(logreg[1:], marked["tests"][:1])
    with pytest.raises(ConfigError, match="method='best'"):
        explain(logreg, marked["tests"][:1], method="best")
    with pytest.raises(ImageError, match="missing.jpg: file not found"):
        explain(logreg, [str(tmp_path / "missing.jpg")])


def test_cli_writes_an_overlay_and_the_raw_map(real_images, tmp_path, python, subprocess_env):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from fracfeat import DeepFeatures

    paths = real_images["fractured"][:2] + real_images["not_fractured"][:2]
    deep = DeepFeatures("vgg16", weights=None, image_size=32, precision="float32", runtime="keras").fit()
    pipe = _pipeline(deep, ("scale", StandardScaler()), ("classifier", LogisticRegression()))
    pipe[1:].fit(deep.transform(paths), [1, 1, 0, 0])
    model = save_model(pipe, tmp_path / "model.joblib")
    out = tmp_path / "maps"
    done = subprocess.run([python, "-m", "fracfeat", "explain", str(model), str(paths[0]), "--out", str(out), "--json"],
                          capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["method"] == "cam" and 0 <= row["probability"] <= 1
    with Image.open(paths[0]) as img:
        size = (img.height, img.width)
    assert np.load(row["npy"]).shape == size
    with Image.open(row["png"]) as png:
        assert (png.height, png.width) == size and png.mode == "RGB"


def test_the_report_shows_each_radiograph_beside_its_heatmap(class_folder, tmp_path):
    """The worst-errors grid gets a heatmap column; with the images gone from disk the page is still made."""
    from conftest import TINY

    from fracfeat import extract, fit, report

    fs = extract(class_folder, store=tmp_path / "store", **TINY)
    fitted = fit(fs, classifier="logreg", n_trials=2, cv=2, seed=0)
    page, _ = report(fitted, fs, tmp_path / "report", n_samples=4, n_boot=50)
    assert "its heatmap (cam)" in page.read_text()
    for path in class_folder.rglob("*.jpg"):
        path.unlink()
    page, _ = report(fitted, fs, tmp_path / "gone", n_samples=4, n_boot=50)
    assert "heatmap" not in page.read_text() and (tmp_path / "gone" / "samples.png").is_file()
