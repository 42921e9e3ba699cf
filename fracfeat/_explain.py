"""explain(): where a fitted model looks, as one heatmap per image at the image's own pixel size.

A map is in the units of the model's log-odds of a fracture: positive where the region pushed
P(fracture) up, negative where it pulled it down. Which method a model gets (:func:`explain_method`):

- ``"cam"``, exact: a linear head (logistic regression) on average-pooled features. The features are
  means of convolution maps A_k over their positions, so the log-odds are ``sum_k w_k mean(A_k) + b``
  with the scaler, PCA and a ``site`` step folded into ``w``; the class activation map
  ``sum_k w_k A_k`` (Zhou et al., 2016) has the log-odds minus ``b`` as its mean over the image.
- ``"gradient"``: the RBF SVM. The channel weights are the analytic gradient of its decision function
  at the image's own features, through the same folding, times the Platt slope (Grad-CAM on the whole
  Pipeline, Selvaraju et al., 2017): exact to first order around the image.
- ``"contributions"``: XGBoost (on features only scaled per feature, as fit makes it). XGBoost's own
  per-feature contributions ``phi_k`` (``pred_contribs``, exact TreeSHAP) spread over the positions in
  proportion to the activation: ``sum_k phi_k A_k / mean(A_k)``, whose mean is the margin minus the bias.
- ``"occlusion"`` (Zeiler and Fergus, 2014), model-agnostic: the drop in log-odds when a patch is
  painted the image's mean colour, averaged over the overlapping patches that cover each pixel. Every
  model that is not one of the above gets it: ``pooling="max"`` or ``"none"``, augmented views, an
  isotonic recalibration, any other classifier.

Features split back to the maps they came from: multi-layer (``layers=``: each tapped layer's map,
upsampled to the image and summed), multi-scale (``scales=``: one backbone per input size), joined
features (each part's backbone) and tiles (``tiles=``) are exact too when every part is average-pooled.
Tiled features are [mean over tiles, max over tiles] of each tile's pooled maps: each tile's map goes
back to the tile's place on the tiled square (overlaps add; times the square's area over the tile's, so
the mean stays the tiles' sum). The mean half's weights go to every tile over the number of tiles; the
max half's weight of a channel goes to the tile holding that channel's max (the subgradient: exact to
first order, where one tile holds the max). The map's mean is still exactly the features' share of the
log-odds (the max is that tile's value); only where the max half's weight sits is first order.

The maps come from a float32 Keras model over the same backbone, weights (verified) and pixels as the
feature step; with ``crop="content"`` the map covers the content box and is 0 outside it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from dataclasses import dataclass

import numpy as np

from ._config import tile_canvas
from ._engine import tile_origins
from ._errors import ConfigError, UnreadableImagesError
from ._images import PixelRecipe, content_box, load_image, pixels_from_array
from ._metrics import split_feature_step
from ._model_io import pipeline_of
from ._runtimes import build_map_model

log = logging.getLogger("fracfeat")

METHODS = ("auto", "exact", "occlusion")
OCCLUSION_GRID = 7  # patches per side: each 1/4 of the side, half overlapping (49 forward passes an image)
_LOGIT_CLIP = 1e-15  # float64 P(fracture) keeps log-odds to about +-34
_CHUNK = 16  # images per call of the map model


class NoMaps(Exception):
    """The backbone's features are not pooled from convolution maps (a user's model cut at a dense layer)."""


@dataclass
class _Head:
    """The head of a Pipeline as explain sees it: per-feature transforms, then the bare classifier."""

    method: str  # "cam", "gradient", "contributions" or "occlusion"
    reason: str = ""  # why occlusion
    transforms: list = dataclasses.field(default_factory=list)
    classifier: object = None
    slope: float = 1.0  # d log-odds / d decision (the Platt sigmoids around the classifier)


def explain_method(model) -> tuple[str, str]:
    """``(method, reason)``: the method :func:`explain` uses for ``model`` with ``method="auto"``, and
    for "occlusion" why no exact one applies (the setting or step that rules it out)."""
    pipeline = pipeline_of(model)
    deep, head = _feature_step(pipeline)
    plan = _plan(deep, head)
    return plan.method, plan.reason


def _feature_step(pipeline):
    deep, head = split_feature_step(pipeline)
    if deep is None:
        raise ConfigError("explain needs a model that reads images (a Pipeline made by fracfeat.fit from store "
                          "features); this one takes feature arrays: fit it on a store version")
    return deep, head


def _parts(deep) -> list:
    from ._transformer import feature_parts

    return feature_parts(deep)


def _plan(deep, head) -> _Head:
    for part in _parts(deep):
        c = part.config_
        # Tiles split back (exact_maps); max or no pooling and views do not.
        ruled_out = f"pooling={c.pooling!r}" if c.pooling != "avg" else f"view={c.view!r}" if c.view else ""
        if ruled_out:
            return _Head("occlusion", f"{ruled_out}: its features are not means of convolution maps")
    return head_plan(head)


def head_plan(head) -> _Head:
    """The exact method the head allows, or occlusion with the reason."""
    steps = list(getattr(head, "steps", [("classifier", head)]))
    transforms, (_, clf) = [s for _, s in steps[:-1] if s not in (None, "passthrough")], steps[-1]
    slope = 1.0
    while True:
        kind = type(clf).__name__
        if kind == "FixedThresholdClassifier":
            clf = clf.estimator_
        elif kind == "SigmoidCalibrated" or (kind == "LocalCalibration" and clf.method == "platt"):
            slope *= float(clf.slope_)
            clf = clf.estimator_ if kind == "SigmoidCalibrated" else clf.estimator
        elif kind == "LocalCalibration":
            return _Head("occlusion", f"a {clf.method} recalibration is not a smooth function of the features")
        else:
            break
    odd = [type(t).__name__ for t in transforms if type(t).__name__ not in _BACKWARD]
    if odd:
        return _Head("occlusion", f"step {odd[0]} is not a linear per-feature transform explain can fold")
    kind = type(clf).__name__
    if kind == "LogisticRegression" and np.shape(clf.coef_)[0] == 1:
        method = "cam"
    elif kind == "SVC" and clf.kernel == "rbf":
        method = "gradient"
    elif kind == "XGBClassifier":
        if any(type(t).__name__ == "PCA" for t in transforms):
            return _Head("occlusion", "XGBoost on PCA components: its contributions are not per feature")
        method = "contributions"
    else:
        return _Head("occlusion", f"classifier {kind} has no exact map here")
    return _Head(method, "", transforms, clf, slope)


# d(out)/d(in) of each per-feature linear step, applied to a gradient: g_in = backward(step, g_out).
def _back_scaler(step, g):
    scale = getattr(step, "scale_", None)
    return g if scale is None else g / scale


def _back_pca(step, g):
    if step.whiten:
        g = g / np.sqrt(step.explained_variance_)
    return g @ step.components_


def _back_site(step, g):
    return g * np.asarray(step.train_scale, np.float64) / step.scale_


_BACKWARD = {"StandardScaler": _back_scaler, "PCA": _back_pca, "SiteStandardizer": _back_site}


def channel_weights(plan: _Head, F: np.ndarray) -> np.ndarray:
    """(n, d) weights of the features ``F`` (n, d): the log-odds' gradient (cam, gradient), or the
    contributions over the feature values (contributions)."""
    F = np.asarray(F, np.float64)
    Z = F
    for step in plan.transforms:
        Z = np.asarray(step.transform(Z), np.float64)
    clf = plan.classifier
    if plan.method == "contributions":
        from ._deps import require

        xgb = require("xgboost", why="explaining an XGBoost model")
        phi = clf.get_booster().predict(xgb.DMatrix(Z.astype(np.float32)), pred_contribs=True)[:, :-1]
        safe = np.abs(F) > 1e-12
        return np.where(safe, phi / np.where(safe, F, 1.0), 0.0)
    if plan.method == "cam":
        g = np.broadcast_to(np.asarray(clf.coef_[0], np.float64), Z.shape)
    else:  # RBF SVM: decision = sum_i a_i exp(-gamma |z - s_i|^2) + b
        gamma = float(clf._gamma)
        sv, a = np.asarray(clf.support_vectors_, np.float64), np.asarray(clf.dual_coef_[0], np.float64)
        d2 = (Z ** 2).sum(1)[:, None] - 2 * Z @ sv.T + (sv ** 2).sum(1)[None, :]
        ka = np.exp(-gamma * np.maximum(d2, 0.0)) * a  # (n, m)
        g = -2.0 * gamma * (ka.sum(1)[:, None] * Z - ka @ sv)
    for step in reversed(plan.transforms):
        g = _BACKWARD[type(step).__name__](step, g)
    return plan.slope * g


def log_odds(head, X) -> np.ndarray:
    """The head's log-odds of a fracture for feature rows ``X`` (P clipped away from 0 and 1)."""
    p = np.clip(np.asarray(head.predict_proba(X)[:, 1], np.float64), _LOGIT_CLIP, 1 - _LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


# -- images ----------------------------------------------------------------------------------------

@dataclass
class _Image:
    """One image to explain: its own size and a plain decoded square (the canvas occlusion paints on)."""

    name: str
    size: tuple[int, int]  # (height, width), EXIF orientation applied
    canvas: np.ndarray  # (D, D, 3) uint8: the whole image squashed, as the backbone sees it without a crop


def _oriented_size(path: str, fallback: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the file as fracfeat decodes it (EXIF orientations 5-8 swap the sides)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            except Exception:  # a damaged EXIF block: fracfeat decodes the image as stored
                turned = False
    except Exception:  # a format Pillow cannot open but fracfeat's decoder can: the decoded square's size
        return fallback
    return (w, h) if turned else (h, w)


def load_images(items, side: int, truncated: str = "read") -> tuple[list, list]:
    """(``_Image`` or None per item, ``(position, reason)`` of each unreadable file); items: paths or arrays."""
    images, failures = [], []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            images.append(_Image(f"image {i}", tuple(item.shape[:2]), pixels_from_array(item, side)))
            continue
        path = os.fspath(item)
        decoded = load_image(path, PixelRecipe(side), truncated)
        if decoded.pixels is None:
            images.append(None)
            failures.append((i, decoded.error))
        else:
            images.append(_Image(path, _oriented_size(path, (side, side)), decoded.pixels))
    return images, failures


def _as_items(images) -> list:
    if isinstance(images, (str, os.PathLike)):
        raise ConfigError(f"explain takes a list of images, got a single path {os.fspath(images)!r}: wrap it in a "
                          f"list: [{os.fspath(images)!r}]")
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
        images = list(images) if images.ndim == 4 else [images]
    items = list(images)
    if not items:
        raise ConfigError("explain got no images: give a list of one or more image paths or uint8 arrays")
    if not all(isinstance(a, (str, os.PathLike)) or (isinstance(a, np.ndarray) and a.dtype == np.uint8)
               for a in items):
        raise ConfigError("explain takes image paths (str or pathlib.Path) or uint8 image arrays")
    return items


def resized_map(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float map resized (bilinear) to ``width`` x ``height``."""
    from PIL import Image

    if grid.shape == (height, width):
        return grid.astype(np.float32)
    return np.asarray(Image.fromarray(np.asarray(grid, np.float32), "F").resize(
        (max(1, width), max(1, height)), Image.Resampling.BILINEAR), dtype=np.float32)


def _placed(square: np.ndarray, image: _Image, crop: str) -> np.ndarray:
    """A map over the backbone's input square back on the image: the whole image, or its content box."""
    from PIL import Image

    h, w = image.size
    if crop != "content":
        return resized_map(square, w, h)
    side = image.canvas.shape[0]
    left, top, right, bottom = content_box(Image.fromarray(image.canvas))
    fx, fy = w / side, h / side
    x0, y0 = int(round(left * fx)), int(round(top * fy))
    x1, y1 = max(x0 + 1, int(round(right * fx))), max(y0 + 1, int(round(bottom * fy)))
    out = np.zeros((h, w), np.float32)
    out[y0:y1, x0:x1] = resized_map(square, x1 - x0, y1 - y0)
    return out


# -- exact maps -------------------------------------------------------------------------------------

# The map models of each feature engine, built once per engine (a fitted Pipeline keeps its engine).
_MAP_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _units(part) -> list:
    """(input size, map model) of each backbone a part's features come from (one per scale)."""
    c = part.config_
    engine = part.engine()  # its weights are verified against the recorded identity
    models = _MAP_MODELS.setdefault(engine, {})
    for size in c.scales or (c.image_size,):
        if size not in models:
            unit = dataclasses.replace(c, image_size=size, scales=(), precision="float32")
            models[size] = build_map_model(unit, engine.weights)
    return [(size, models[size]) for size in c.scales or (c.image_size,)]


def _part_maps(part, units, items) -> list:
    """Per unit, the list of (n, t, h, w, k) float32 maps (taps, then final) of the part's own pixels:
    t = 1 untiled, else one map per tile (cut from the decoded square as the engine cuts them)."""
    engine = part.engine()
    c = part.config_
    arrays = isinstance(items[0], np.ndarray)
    decoded = (engine.iter_decoded_arrays(items) if arrays
               else engine.iter_decoded([os.fspath(p) for p in items], workers=part.workers))
    pixels = np.stack([d.pixels for _, d in decoded])
    out = []
    for size, model in units:
        if c.tiles > 1:
            batch = np.stack([pixels[:, y:y + size, x:x + size] for y, x in tile_origins(size, c.tiles)], axis=1)
            batch = batch.reshape(-1, size, size, 3)  # image-major: image 0's tiles, then image 1's...
        else:
            batch = pixels if size == pixels.shape[1] else np.stack([pixels_from_array(im, size) for im in pixels])
        chunks = [model(batch[lo:lo + _CHUNK], training=False) for lo in range(0, len(batch), _CHUNK)]
        chunks = [ch if isinstance(ch, (list, tuple)) else [ch] for ch in chunks]
        if any(len(np.shape(m)) != 4 for m in chunks[0]):
            raise NoMaps(f"{c.backbone} gives no convolution map at its feature layer")
        maps = [np.concatenate([np.asarray(ch[k], np.float32) for ch in chunks]) for k in range(len(chunks[0]))]
        out.append([m.reshape(len(pixels), -1, *m.shape[1:]) for m in maps])
    return out


def _unit_features(pooled: np.ndarray) -> np.ndarray:
    """A unit's feature rows from its pooled maps per tile (n, t, d): as they are untiled (t = 1), else
    [mean over tiles, max over tiles] as the engine combines them."""
    if pooled.shape[1] == 1:
        return pooled[:, 0]
    return np.concatenate([pooled.mean(axis=1), pooled.max(axis=1)], axis=1)


def _tile_weights(pooled: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(n, t, d) weight of each tile's pooled map, from the weights ``g`` of the unit's features.

    The mean over tiles is linear: its weight goes to every tile, over t. The max over tiles goes to
    the tile holding the max of each channel, the subgradient: exact to first order (where one tile
    holds the max), and ``sum_t w_t pooled_t`` is still exactly ``g . features``.
    """
    n, t, d = pooled.shape
    if t == 1:
        return g[:, None, :]
    w = np.repeat(g[:, None, :d] / t, t, axis=1)
    rows, channels = np.arange(n)[:, None], np.arange(d)[None, :]
    w[rows, pooled.argmax(axis=1), channels] += g[:, d:]
    return w


def _tiled_squares(cams: np.ndarray, size: int, tiles: int) -> np.ndarray:
    """(n, D, D) maps over the tiled square from each tile's map (n, t, h, w): each resized to its tile,
    put at the tile's place, overlaps added, times (D / size)^2, so the square's mean is the sum of the
    tiles' means (as each tile's map's mean is its share of the log-odds)."""
    side = tile_canvas(size, tiles)
    out = np.zeros((len(cams), side, side), np.float32)
    area = (side / size) ** 2
    for k, (y, x) in enumerate(tile_origins(size, tiles)):
        for i in range(len(cams)):
            out[i, y:y + size, x:x + size] += resized_map(cams[i, k], size, size) * area
    return out


def exact_maps(deep, plan: _Head, items, images: list) -> list[np.ndarray]:
    """The exact maps (cam, gradient, contributions) of readable ``items`` on their ``images``."""
    parts = _parts(deep)
    units = [(part, unit) for part in parts for unit in _part_maps(part, _units(part), items)]
    # Pooled maps per tile (n, t, d), taps before final; the features concatenate parts, then scales.
    pooled = [np.concatenate([m.mean(axis=(2, 3)) for m in unit], axis=-1) for _, unit in units]
    F = np.concatenate([_unit_features(p) for p in pooled], axis=1)
    G = channel_weights(plan, F).astype(np.float32)
    out = [np.zeros(im.size, np.float32) for im in images]
    offset = 0
    for (part, unit), p in zip(units, pooled):
        width = p.shape[-1] * (1 if p.shape[1] == 1 else 2)
        weights, offset = _tile_weights(p, G[:, offset:offset + width]), offset + width
        first = 0
        for m in unit:
            k = m.shape[-1]
            cams = np.einsum("nthwk,ntk->nthw", m, weights[..., first:first + k])
            first += k
            c = part.config_
            squares = cams[:, 0] if c.tiles == 1 else _tiled_squares(cams, c.image_size, c.tiles)
            for i, image in enumerate(images):
                out[i] += _placed(squares[i], image, c.crop)
    return out


# -- occlusion ---------------------------------------------------------------------------------------

def occlusion_map(deep, head, image: _Image, grid: int = OCCLUSION_GRID) -> np.ndarray:
    """The drop in log-odds when each of ``grid`` x ``grid`` half-overlapping patches is painted the
    image's mean colour, averaged per pixel over the patches covering it, on the image's own size."""
    canvas = image.canvas
    side = canvas.shape[0]
    stride = side / (grid + 1)
    fill = canvas.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    boxes, batch = [], [canvas]
    for i in range(grid):
        for j in range(grid):
            y0, x0 = int(round(i * stride)), int(round(j * stride))
            y1, x1 = int(round((i + 2) * stride)), int(round((j + 2) * stride))
            painted = canvas.copy()
            painted[y0:y1, x0:x1] = fill
            boxes.append((y0, y1, x0, x1))
            batch.append(painted)
    scores = log_odds(head, deep.transform(np.stack(batch)))
    total, count = np.zeros((side, side)), np.zeros((side, side))
    for (y0, y1, x0, x1), s in zip(boxes, scores[1:]):
        total[y0:y1, x0:x1] += scores[0] - s
        count[y0:y1, x0:x1] += 1
    return resized_map(total / np.maximum(count, 1), image.size[1], image.size[0])


def canvas_side(deep) -> int:
    """Side of the plain square occlusion paints on: the largest any part decodes."""
    return max(part.config_.decode_size for part in _parts(deep))


# -- the API -----------------------------------------------------------------------------------------

def explain_each(model, images, *, method: str = "auto", grid: int = OCCLUSION_GRID):
    """As :func:`explain`, with unreadable images as values: ``(maps with None for those, method used,
    (position, reason) of each, the loaded images)``. The report uses it to draw what it can."""
    pipeline = pipeline_of(model)
    deep, head = _feature_step(pipeline)
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ConfigError(f"grid={grid!r}: give a positive number of occlusion patches per side, e.g. {OCCLUSION_GRID}")
    items = _as_items(images)
    plan = _plan(deep, head) if method != "occlusion" else _Head("occlusion", "asked for")
    if method == "exact" and plan.method == "occlusion":
        raise _no_exact(plan.reason)
    loaded, failures = load_images(items, canvas_side(deep), _parts(deep)[0].config_.truncated)
    ok = [i for i, im in enumerate(loaded) if im is not None]
    maps = [None] * len(items)
    if ok and plan.method != "occlusion":
        try:
            for i, m in zip(ok, exact_maps(deep, plan, [items[i] for i in ok], [loaded[i] for i in ok])):
                maps[i] = m
        except NoMaps as e:
            if method == "exact":
                raise _no_exact(str(e)) from None
            plan = _Head("occlusion", str(e))
    if ok and plan.method == "occlusion":
        for i in ok:
            maps[i] = occlusion_map(deep, head, loaded[i], grid)
    return maps, plan.method, failures, loaded


def _no_exact(reason: str) -> ConfigError:
    return ConfigError(f"this model has no exact heatmap ({reason}); use method='occlusion' (or 'auto')")


def explain(model, images, *, method: str = "auto", grid: int = OCCLUSION_GRID) -> list[np.ndarray]:
    """Where the model looks: one heatmap per image, higher where the region pushed P(fracture) up.

    Parameters
    ----------
    model : Pipeline, FitResult, or path of a saved model
        A model made by :func:`fracfeat.fit` (its first step reads images).
    images : sequence of paths, or of uint8 arrays
        Image files (any format ``extract`` reads) or images in memory.
    method : {"auto", "exact", "occlusion"}
        "auto": the exact map the model allows (:func:`explain_method`: class activation map of a linear
        head, the SVM's gradient, XGBoost's contributions), else occlusion. "exact" refuses a model that
        has none; "occlusion" is the model-agnostic check of the others.
    grid : int
        Occlusion patches per side (``grid`` x ``grid`` forward passes per image).

    Returns
    -------
    list of ndarray
        One float32 array of shape (height, width) per image, at the image's own pixel size (EXIF
        orientation applied), in units of the model's log-odds of a fracture: positive regions pushed
        the score up, negative ones down. An exact map's mean over the image (the content box with
        ``crop="content"``) is the log-odds minus the classifier's intercept (first order for the SVM).

    Raises
    ------
    fracfeat.ImageError
        Images cannot be read (the message names each).
    fracfeat.ConfigError
        The model takes feature arrays, or ``method="exact"`` for a model that has no exact map.

    Examples
    --------
    >>> from fracfeat import explain
    >>> [heat] = explain("model.joblib", ["wrist.jpg"])     # doctest: +SKIP
    >>> heat.shape                                         # doctest: +SKIP
    (454, 373)
    """
    maps, _, failures, _ = explain_each(model, images, method=method, grid=grid)
    if failures:
        items = _as_items(images)
        raise UnreadableImagesError([(os.fspath(items[i]), reason) for i, reason in failures], len(items),
                                    "fix them or leave them out of explain's images")
    return maps


# -- pictures ----------------------------------------------------------------------------------------

def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The grayscale radiograph (h, w, 3 uint8) with the map's positive part in a heat colour scale on top.

    The scale runs from 0 to the map's largest absolute value, so a map whose regions all pulled the
    score down shows (almost) no colour; where the map is 0 the radiograph shows through.
    """
    from ._deps import require

    cm = require("matplotlib", why="heatmap overlays").colormaps["jet"]
    h, w = heat.shape
    base = resized_map(np.asarray(image, np.float32).mean(axis=-1), w, h)[..., None].repeat(3, axis=-1)
    top = float(np.abs(heat).max()) or 1.0
    level = np.clip(heat / top, 0.0, 1.0)
    color = cm(level)[..., :3] * 255.0
    a = (alpha * np.sqrt(level))[..., None]
    return np.clip(base * (1 - a) + color * a, 0, 255).astype(np.uint8)


def _own_pixels(item, image: _Image) -> np.ndarray:
    """The image decoded at its own resolution (squashed to a square of its longer side), for overlays."""
    side = max(image.size)
    if isinstance(item, np.ndarray):
        return pixels_from_array(item, side)
    decoded = load_image(os.fspath(item), PixelRecipe(side))
    return decoded.pixels if decoded.pixels is not None else image.canvas


def save_explanations(model, images, out_dir, *, method: str = "auto", grid: int = OCCLUSION_GRID) -> list[dict]:
    """Write ``OUT/<name>.png`` (the overlay) and ``OUT/<name>.npy`` (the raw map) per image.

    Returns ``{"path", "probability", "method", "png", "npy"}`` per image (the CLI prints them).
    """
    from pathlib import Path

    from PIL import Image

    maps, used, failures, loaded = explain_each(model, images, method=method, grid=grid)
    items = _as_items(images)
    if failures:
        raise UnreadableImagesError([(os.fspath(items[i]), reason) for i, reason in failures], len(items),
                                    "fix them or leave them out of the IMAGE arguments")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline_of(model)
    deep, head = _feature_step(pipeline)
    proba = head.predict_proba(deep.transform(items))[:, 1]
    rows, taken = [], set()
    for item, heat, image, p in zip(items, maps, loaded, proba):
        stem = Path(image.name).stem if not isinstance(item, np.ndarray) else image.name.replace(" ", "-")
        name, k = stem, 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}"
        taken.add(name)
        np.save(out / f"{name}.npy", heat)
        Image.fromarray(overlay(_own_pixels(item, image), heat)).save(out / f"{name}.png")
        rows.append({"path": image.name, "probability": round(float(p), 6), "method": used,
                     "png": str(out / f"{name}.png"), "npy": str(out / f"{name}.npy")})
    return rows
