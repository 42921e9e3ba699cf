"""The extractor configuration: everything that changes the numbers, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from ._backbones import backbone_spec, resolve_image_size, resolve_pooling
from ._errors import ConfigError
from ._images import DECODE_RECIPE, TRUNCATED_POLICIES

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
RUNTIMES = ("auto", "keras", "openvino")

# Bump when a code change alters features for identical settings, so old cache rows stop matching.
FEATURE_CODE_VERSION = 1


@dataclass(frozen=True)
class ExtractorConfig:
    """Fully resolved settings of one feature extractor (no "auto" left)."""

    backbone: str
    image_size: int
    pooling: str
    preprocessing: str
    weights: str  # identity, e.g. "file:sha256:<hex>"
    precision: str
    runtime: str
    decode: str = DECODE_RECIPE
    truncated: str = "read"
    feature_code_version: int = FEATURE_CODE_VERSION
    # Detail-keeping views (see :func:`validate_detail`). Left out of as_dict() at their defaults, so the
    # fingerprints of plain extractors, and every store row made before these existed, stay valid.
    tiles: int = 1
    scales: tuple = ()
    # Intermediate layers pooled and concatenated before the final output (see :func:`validate_layers`);
    # out of as_dict() when empty, for the same reason.
    layers: tuple = ()
    # Augmented view applied before resizing (fracfeat._views), "" for the image as it is; out of
    # as_dict() when "", for the same reason.
    view: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.tiles == 1:
            del d["tiles"]
        if not self.view:
            del d["view"]
        for name in ("scales", "layers"):
            if d[name]:
                d[name] = list(d[name])  # JSON has lists: provenance read back must give the same fingerprint
            else:
                del d[name]
        return d

    @property
    def decode_size(self) -> int:
        """Side of the square each file is decoded to before the backbone sees it (or its tiles/scales)."""
        if self.tiles > 1:
            return tile_canvas(self.image_size, self.tiles)
        return max(self.scales) if self.scales else self.image_size

    @property
    def n_views(self) -> int:
        """Backbone passes per image."""
        return self.tiles * self.tiles if self.tiles > 1 else max(1, len(self.scales))

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of every field: rows are reused only under an identical one."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def tile_canvas(tile: int, tiles: int) -> int:
    """Side of the image cut into ``tiles`` x ``tiles`` tiles of ``tile`` px overlapping by half."""
    return tile * (tiles + 1) // 2


def validate_detail(spec, image_size: int, tiles, scales) -> tuple[int, int, tuple]:
    """Check the detail-keeping options; returns (image_size, tiles, scales) resolved.

    - ``tiles=n`` (n >= 2): the image is resized to ``image_size * (n + 1) / 2`` px and cut into n x n
      tiles of ``image_size`` px overlapping by half; each tile goes through the backbone and its global
      pooling, and the per-tile features are pooled over tiles by mean and by max, concatenated
      (2 x the backbone's width). A fracture a few pixels wide at 224 px gets n/2 times more pixels.
    - ``scales=(s1, s2, ...)``: the backbone runs on the whole image at each size and the features are
      concatenated in that order; ``image_size`` is then the largest scale.
    """
    if isinstance(tiles, bool) or not isinstance(tiles, (int, np.integer)) or tiles < 1:
        raise ConfigError(f"tiles={tiles!r}: give a whole number >= 1 (tiles per side; 1 = no tiling)")
    tiles = int(tiles)
    if scales is None or (not isinstance(scales, (str, bytes)) and len(scales) == 0):
        scales = ()
    else:
        if isinstance(scales, str):
            scales = [v for v in scales.replace(" ", "").split(",") if v]
        try:
            scales = tuple(int(v) for v in scales)
        except (TypeError, ValueError):
            raise ConfigError(f"scales={scales!r}: give input sizes, e.g. (224, 448) or '224,448'") from None
        if len(scales) < 2 or len(set(scales)) != len(scales):
            raise ConfigError(f"scales={scales!r}: give two or more different input sizes, e.g. (224, 448)")
        for s in scales:
            resolve_image_size(spec, s)  # each must suit the backbone
    if tiles > 1 and scales:
        raise ConfigError("tiles= and scales= cannot be combined; pick one")
    if scales:
        image_size = max(scales)
    return image_size, tiles, scales


def validate_layers(spec, pooling: str, layers) -> tuple:
    """Check ``layers=``; returns the layer names resolved, in the order given.

    Each named intermediate layer's output is globally pooled like the final one (``pooling``) and the
    pooled vectors are concatenated in the given order, followed by the final output's: VGG16 with
    ``("block4_pool",)`` gives 512 + 512 features. Shallower layers pool a finer grid of lower-level
    features, which the final layer has already merged into coarse cells. ``"all"`` names every tap
    point of the backbone (:attr:`BackboneSpec.tap_layers`).
    Combines with ``tiles``/``scales``: every tile or scale gets the same multi-layer vector.
    """
    if layers is None:
        return ()
    if isinstance(layers, str):
        layers = [v for v in layers.replace(" ", "").split(",") if v]
    names = tuple(layers) if isinstance(layers, (list, tuple)) else None
    if names is None or not all(isinstance(v, str) for v in names):
        raise ConfigError(f"layers={layers!r}: give layer names, e.g. ('block4_pool',) or 'block3_pool,block4_pool'")
    if not names:
        return ()
    if names == ("all",):
        names = spec.tap_layers
    unknown = [v for v in names if v not in spec.tap_layers]
    if unknown:
        raise ConfigError(f"layers={layers!r}: {', '.join(map(repr, unknown))} is not a tap point of {spec.name}; "
                          f"choose from {', '.join(spec.tap_layers)} (or 'all')")
    if len(set(names)) != len(names):
        raise ConfigError(f"layers={layers!r}: each layer once, please (its features would be repeated)")
    if pooling == "none":
        raise ConfigError(f"layers={layers!r} with pooling='none': layers= pools each layer's map to one value per "
                          f"channel, and pooling='none' keeps maps whole (of a different size per layer); "
                          f"pass pooling='avg' or 'max', or leave layers out")
    return names


def check_choice(name: str, value, choices) -> str:
    v = str(value).lower()
    if v not in choices:
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return v


def validate_settings(backbone, image_size, pooling, precision, runtime, truncated):
    """Check the cheap settings up front (before any file is read or Keras imported)."""
    spec = backbone_spec(backbone)
    size = resolve_image_size(spec, image_size)
    pool = resolve_pooling(pooling)
    prec = check_choice("precision", precision, PRECISIONS)
    rt = check_choice("runtime", runtime, RUNTIMES)
    tr = check_choice("truncated", truncated, TRUNCATED_POLICIES)
    return spec, size, pool, prec, rt, tr
