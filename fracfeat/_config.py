"""Extractor settings: the one place an extractor option is declared, resolved and fingerprinted.

- :class:`ExtractorSettings` is what a user passes (``"auto"`` allowed): ``extract``, ``DeepFeatures``,
  the parts of joined features, presets, the store's descriptions and the CLI all take their
  parameters from its fields.
- :meth:`ExtractorSettings.resolve` turns settings into an :class:`ExtractorConfig` (nothing "auto"
  left, the weights' identity) and the weights to build the backbone from.
- :class:`ExtractorConfig` is everything that changes the numbers; its fingerprint keys the cache.
  :meth:`ExtractorConfig.from_provenance` reads it back from a store version.

Adding an option: a field of :class:`ExtractorSettings` made with :func:`option` (default, help, and
``off``: the resolved value that means "not used", left out of the fingerprint so that every row
stored before the option existed stays valid), its check in :meth:`ExtractorSettings.resolve`, and the
code that uses it. Nothing else lists options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass, field

import numpy as np

from ._backbones import (BACKBONES, ResolvedWeights, backbone_spec, check_feature_layer, is_keras_model,
                         model_object_weights, resolve_image_size, resolve_pooling, resolve_preprocessing,
                         resolve_weights)
from ._dicom import FRAMES, INVERSIONS, WINDOWS
from ._errors import ConfigError, WeightsError
from ._hardware import Hardware, choose_precision_and_runtime
from ._images import CROPS, DECODE_RECIPE, INTENSITIES, TRUNCATED_POLICIES, clahe_library
from ._views import check_view

PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
RUNTIMES = ("auto", "keras", "openvino")

# Bump when a code change alters features for identical settings, so old cache rows stop matching.
FEATURE_CODE_VERSION = 1

_ALWAYS = object()  # ``off`` of the settings every fingerprint holds (they predate optional ones)


def option(default, help: str, *, off=_ALWAYS, metavar: str | None = None, cli_type=None, choices=None,
           per_part: bool = True, view: bool = False):
    """A field of :class:`ExtractorSettings` with what every consumer needs to know about it.

    Parameters
    ----------
    default
        The user-facing default (may be "auto" or None).
    help : str
        One line for the command line's ``--help`` and the docs.
    off
        The resolved value meaning "not used": the fingerprint leaves the field out at that value, so
        fingerprints made before the option existed stay valid. New options must give one.
    metavar, cli_type, choices
        How the command line spells the value (``cli_type=int``...).
    per_part : bool
        Whether a part of ``extract(join=...)`` may set it (False: the whole call's).
    view : bool
        An augmented view of the image: ``run`` and ``fit`` take views through ``augment=``, not as a setting.
    """
    meta = dict(help=help, off=off, metavar=metavar, cli_type=cli_type, choices=choices, per_part=per_part, view=view)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ExtractorSettings:
    """How to turn an image into a feature vector, as a user gives it ("auto" allowed).

    Pass the fields as keywords to :func:`fracfeat.extract`, :class:`fracfeat.DeepFeatures` or
    :func:`fracfeat.run`, or as ``--option`` on the command line (``--image-size 448``).
    """

    backbone: str = option("vgg16", "vgg16, resnet50, efficientnetb2, any keras.applications CNN (`fracfeat "
                                    "backbones` lists them), or keras: your own model given as weights=<file>.keras "
                                    "(in Python, a keras.Model object itself)")
    image_size: int | None = option(None, "square input size in pixels (default: the backbone's, e.g. 224)",
                                    metavar="N", cli_type=int)
    pooling: str = option("avg", "global pooling of the last convolution map: avg, max, or none to flatten it")
    precision: str = option("auto", "auto, float32, bfloat16, float16 or int8: auto picks the fastest correct one for "
                                    "the backbone and hardware (int8 only given quantized=)")
    runtime: str = option("auto", "auto, keras or openvino")
    truncated: str = option("read", "truncated image files: read what is there (flagged per row) or record "
                                    "them as failures", choices=TRUNCATED_POLICIES, per_part=False)
    tiles: int = option(1, "keep small detail: N x N tiles overlapping by half, of image-size px each, cut "
                           "from the image resized to image-size x (N+1)/2, their features pooled by mean and "
                           "by max (1: the whole image once)", off=1, metavar="N", cli_type=int)
    scales: tuple | None = option(None, "multi-scale: concatenate the features of the whole image at these "
                                        "input sizes, e.g. 224,448 (not with tiles)", off=(), metavar="S1,S2")
    layers: tuple | None = option(None, "multi-layer: these intermediate layers, pooled, before the final "
                                        "features, e.g. block3_pool,block4_pool for vgg16, or 'all' (needs "
                                        "pooling avg or max)", off=(), metavar="L1,L2")
    view: str | None = option(None, "an augmented view of every image, as its own store entry, for `fit "
                                    "--augment`: hflip, rot+N / rot-N (degrees), or cropF (central fraction, e.g. "
                                    "crop0.8)", off="", metavar="VIEW", per_part=False, view=True)
    crop: str = option("none", "site-robust framing: content crops each radiograph to its content before the "
                               "resize (the box of the foreground by a three-class Otsu threshold on a 128 px copy, "
                               "specks dropped, a margin of 1/25 of each side; the whole image when there is no "
                               "clear foreground), or none", off="none", choices=CROPS)
    intensity: str = option("none", "site-robust exposure, on the grayscale: percentile stretches its 1st..99th "
                                    "percentile to 0..255, clahe equalises local contrast (OpenCV CLAHE: pip install "
                                    "'fracfeat[clahe]'), or none", off="none", choices=INTENSITIES)
    dicom_window: str = option("first", "DICOM files: the VOI applied after the modality LUT: first (the file's first "
                                        "VOI LUT, else its first window center/width), widest (its widest window), or "
                                        "none (the full range of Bits Stored)", off="first", choices=WINDOWS)
    dicom_invert: str = option("monochrome1", "DICOM files: monochrome1 inverts MONOCHROME1 images (white is zero) "
                                              "as a viewer shows them, never leaves them as stored",
                               off="monochrome1", choices=INVERSIONS)
    dicom_frame: str = option("first", "DICOM files: which frame of a multi-frame file is the image: first or middle",
                              off="first", choices=FRAMES)
    feature_layer: str | None = option(None, "backbone=keras (your own model, weights=<file>.keras): the layer whose "
                                             "output, pooled, is the features (default: the model's output)",
                                       off="", metavar="LAYER")
    # Always fingerprinted (every version has recorded it): "auto" resolves to the backbone's own mode.
    preprocessing: str = option("auto", "input preprocessing: auto (the backbone's own), caffe, tf ([-1, 1]), torch, "
                                        "raw-0-255 or scale-0-1 ([0, 1]); backbone=keras must declare it",
                                metavar="MODE")
    quantized: str | None = option(None, "an int8 model `fracfeat quantize` made for these settings (its folder): "
                                         "precision int8 on OpenVINO, its own store entry", off="", metavar="DIR")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def options(cls) -> tuple[dataclasses.Field, ...]:
        """The fields, with their :func:`option` metadata (``help``, ``off``, ``per_part``...)."""
        return dataclasses.fields(cls)

    @classmethod
    def from_kwargs(cls, where: str = "", **kwargs) -> "ExtractorSettings":
        """Settings from keywords, with a ConfigError naming the known ones for any other."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise ConfigError(f"{where or 'the extractor'} got unknown setting(s) {', '.join(unknown)}: the "
                              f"extractor settings are {', '.join(cls.names())}")
        return cls(**kwargs)

    def given(self) -> dict:
        """The settings that differ from the defaults."""
        return {f.name: getattr(self, f.name) for f in self.options() if getattr(self, f.name) != f.default}

    def replace(self, **changes) -> "ExtractorSettings":
        return dataclasses.replace(self, **changes)

    def resolve(self, weights="imagenet", *, weights_identity: str | None = None,
                hardware: Hardware | None = None) -> tuple["ExtractorConfig", ResolvedWeights | None]:
        """The exact extractor these settings make here, and its weights.

        Cheap checks come first (before any file is read or Keras imported). ``weights_identity``
        (``"file:sha256:<hex>"``) stands in for reading and hashing ``weights``: the weights are then
        verified when the backbone is built, and None is returned for them. ``hardware`` (default:
        this machine) is what "auto" precision and runtime are chosen for.
        """
        spec = backbone_spec(self.backbone)
        image_size = resolve_image_size(spec, self.image_size)
        pooling = resolve_pooling(self.pooling)
        precision = check_choice("precision", self.precision, PRECISIONS)
        runtime = check_choice("runtime", self.runtime, RUNTIMES)
        int8 = bool(self.quantized) or precision == "int8"
        if int8:
            precision, runtime = check_int8(precision, runtime, self.quantized)
        truncated = check_choice("truncated", self.truncated, TRUNCATED_POLICIES)
        tiles, scales = check_tiles(self.tiles), check_scales(spec, self.scales)
        if tiles > 1 and scales:
            raise ConfigError("tiles= and scales= cannot be combined; pick one")
        image_size = max(scales) if scales else image_size
        check_input_side(spec, image_size, tiles)
        layers = check_layers(spec, pooling, self.layers)
        view = check_view(self.view)
        crop, intensity = check_choice("crop", self.crop, CROPS), check_choice("intensity", self.intensity, INTENSITIES)
        dicom = dict(dicom_window=check_choice("dicom_window", self.dicom_window, WINDOWS),
                     dicom_invert=check_choice("dicom_invert", self.dicom_invert, INVERSIONS),
                     dicom_frame=check_choice("dicom_frame", self.dicom_frame, FRAMES))
        if intensity == "clahe":
            clahe_library()  # before any file is read: MissingDependencyError naming the install command
        feature_layer = check_feature_layer(spec, self.feature_layer)
        if is_keras_model(self.backbone):  # a model object: kept as a content-addressed .keras file
            resolved = model_object_weights(self.backbone, weights, feature_layer)
            if weights_identity is not None and weights_identity != resolved.identity:
                raise WeightsError(f"backbone={self.backbone.name!r} is not the model these features were made "
                                   f"with ({resolved.identity} here, {weights_identity} there)")
            weights_identity = None
        else:
            resolved = None if weights_identity is not None else resolve_weights(spec, weights)
        if runtime == "auto" and not spec.runtime_measured:
            runtime = "keras"  # the "auto" table holds measured backbones only; Keras runs every model
        if not int8:
            precision, runtime = choose_precision_and_runtime(spec, precision, runtime, hardware, calibration=dict(
                settings=self, image_size=image_size, weights=weights, resolved=resolved, identity=weights_identity))
        config = ExtractorConfig(
            backbone=spec.name, image_size=image_size, pooling=pooling, precision=precision, runtime=runtime,
            truncated=truncated, tiles=tiles, scales=scales, layers=layers, view=view, crop=crop, intensity=intensity,
            **dicom,
            feature_layer=feature_layer,
            preprocessing=resolve_preprocessing(spec, self.preprocessing),
            weights=str(weights_identity) if resolved is None else resolved.identity,
        )
        if self.quantized:
            from ._quantize import resolve_quantized  # it imports this module

            config = dataclasses.replace(config, quantized=resolve_quantized(self.quantized, config))
        return config, resolved


@dataclass(frozen=True)
class ExtractorConfig(ExtractorSettings):
    """Fully resolved settings of one feature extractor (no "auto" left), and its fingerprint.

    Its settings fields hold resolved values (``scales=()`` when unused...); the fields below are fixed by
    the code and the weights.
    """

    preprocessing: str = option("", "the backbone's input preprocessing (caffe, torch, ...)")
    weights: str = option("", "identity of the weights, e.g. file:sha256:<hex>")
    decode: str = option(DECODE_RECIPE, "how files are decoded and resized")
    feature_code_version: int = option(FEATURE_CODE_VERSION, "version of the feature code")

    def __post_init__(self):
        # An option not given is at its "off" value (the user-facing default None means the same); JSON's
        # lists are the settings' tuples.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata["off"] is not _ALWAYS:
                object.__setattr__(self, f.name, f.metadata["off"])
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    def as_dict(self) -> dict:
        """The fingerprinted fields: every one but those at their ``off`` value; tuples as lists (JSON's)."""
        d = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["off"] is not _ALWAYS and value == f.metadata["off"]:
                continue
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d

    def settings(self) -> ExtractorSettings:
        """The settings that make this extractor again (unused options at their defaults)."""
        values = {f.name: getattr(self, f.name) for f in ExtractorSettings.options()}
        return ExtractorSettings(**{f.name: f.default if values[f.name] == f.metadata["off"] else values[f.name]
                                    for f in ExtractorSettings.options()})

    @classmethod
    def from_provenance(cls, provenance: dict) -> "ExtractorConfig":
        """The exact extractor a store version was made with (resolved precision/runtime, no "auto")."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.metadata["off"] is _ALWAYS and f.name not in provenance]
        if missing:
            raise ConfigError(f"provenance lacks {', '.join(missing)}: it does not come from a fracfeat store version")
        config = cls(**{f.name: provenance[f.name] for f in fields if f.name in provenance})
        recorded = provenance.get("fingerprint")
        if recorded and recorded != config.fingerprint:
            raise ConfigError(f"provenance fingerprint {recorded[:12]} does not match its own settings "
                              f"({config.fingerprint[:12]}): the version's attributes were edited or damaged")
        return config

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


def options_text(provenance: dict) -> str:
    """``tiles=3 layers=block3_pool,block4_pool view=hflip``: the optional settings a version's extractor was given."""
    texts = []
    for f in ExtractorSettings.options():
        value = provenance.get(f.name)
        if f.metadata["off"] is not _ALWAYS and value is not None and value != f.metadata["off"] and value != []:
            texts.append(f"{f.name}={','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return " ".join(texts)


# The largest side an image is decoded to (image_size, the largest of scales, or the tiled canvas). The
# backbones were trained at 224-260 px, and memory grows with the square of the side: VGG16's first block
# holds 64 float32 channels at full resolution, two tensors at a time, 512 bytes per input pixel (measured:
# one 1024 px image's float32 forward pass on CPU raised peak memory by 0.54 GiB, 512 px by 0.17 GiB), so
# one Keras call of 8 images (fracfeat's CPU chunk) at 2048 px needs about 16 GiB.
MAX_IMAGE_SIZE = 2048


def check_input_side(spec, image_size: int, tiles: int) -> None:
    """A ConfigError when the decoded side (the tiled canvas for ``tiles > 1``) exceeds MAX_IMAGE_SIZE."""
    side = tile_canvas(image_size, tiles) if tiles > 1 else image_size
    if side <= MAX_IMAGE_SIZE:
        return
    if tiles > 1:
        what, fix = f"tiles={tiles} of {image_size} px make a {side} px image, which is", "fewer or smaller tiles"
    else:
        what = f"image_size={image_size} is"
        fix = (f"image_size <= {MAX_IMAGE_SIZE} (about {8 * 512 * side * side / 2**30:,.0f} GiB per forward pass "
               f"of 8 images at {side} px), or tiles= to see a large radiograph in more detail")
    raise ConfigError(f"{what} above the {MAX_IMAGE_SIZE} px fracfeat takes ({spec.name} was trained at "
                      f"{spec.default_size} px, and memory grows with the square of the side): pass {fix}")


def tile_canvas(tile: int, tiles: int) -> int:
    """Side of the image cut into ``tiles`` x ``tiles`` tiles of ``tile`` px overlapping by half."""
    return tile * (tiles + 1) // 2


def check_tiles(tiles) -> int:
    """``tiles=n``: n x n tiles overlapping by half (1: the whole image once).

    The image is resized to ``image_size * (n + 1) / 2`` px and cut into tiles of ``image_size`` px;
    each goes through the backbone and its global pooling, and the per-tile features are pooled over
    tiles by mean and by max, concatenated (2 x the backbone's width). A fracture a few pixels wide
    at 224 px gets n/2 times more pixels.
    """
    if isinstance(tiles, bool) or not isinstance(tiles, (int, np.integer)) or tiles < 1:
        raise ConfigError(f"tiles={tiles!r}: give a whole number >= 1 (tiles per side; 1 = no tiling)")
    return int(tiles)


def check_scales(spec, scales) -> tuple:
    """``scales=(s1, s2, ...)``: the whole image at each input size, features concatenated in that order."""
    if scales is None or (not isinstance(scales, (str, bytes)) and len(scales) == 0):
        return ()
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
    return scales


def check_layers(spec, pooling: str, layers) -> tuple:
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
    if not spec.tap_layers:
        tapped = ", ".join(name for name, other in BACKBONES.items() if other.tap_layers)
        own = ", or pick your model's layer with feature_layer=" if spec.name == "keras" else ""
        raise ConfigError(f"layers={layers!r}: fracfeat knows tap points of {tapped} only, not of {spec.name}; leave "
                          f"layers out{own}")
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


def check_int8(precision: str, runtime: str, quantized) -> tuple[str, str]:
    """("int8", "openvino") for ``quantized=`` (precision "auto" or "int8"), a ConfigError for the rest."""
    make = "make one with `fracfeat quantize IMAGES --out DIR` (fracfeat.quantize) and pass quantized=DIR"
    if not quantized:
        raise ConfigError(f"precision='int8' needs a quantized model of these settings: {make}")
    if precision not in ("auto", "int8"):
        raise ConfigError(f"quantized= runs the int8 model, not precision={precision!r}: drop precision= (or pass "
                          f"'int8'), or drop quantized= for {precision}")
    if runtime == "keras":
        raise ConfigError("int8 runs on OpenVINO only, not runtime='keras': drop runtime= (or pass 'openvino')")
    return "int8", "openvino"


def check_choice(name: str, value, choices) -> str:
    v = str(value).lower()
    if v not in choices:
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return v


def settings_doc(indent: int = 4) -> str:
    """The settings as numpydoc parameter entries (``name : default ...`` then the help), for docstrings."""
    pad = " " * indent
    return "\n".join(f"{pad}{f.name} : default {f.default!r}\n{pad}    {f.metadata['help']}"
                     for f in ExtractorSettings.options())


def resolve_extractor(*args, hardware: Hardware | None = None,
                      **kwargs) -> tuple[ExtractorConfig, ResolvedWeights | None]:
    """``resolve_extractor("vgg16", weights, 224, "avg", ...)``: :meth:`ExtractorSettings.resolve` in one call.

    Arguments in :class:`fracfeat.DeepFeatures`' order: ``backbone``, ``weights``, then the other settings
    in their field order; keywords as their names.
    """
    first, *rest = ExtractorSettings.names()
    order = (first, "weights", *rest)
    if len(args) > len(order):
        raise TypeError(f"resolve_extractor takes at most {len(order)} positional arguments ({', '.join(order)})")
    given = dict(zip(order, args))
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise TypeError(f"resolve_extractor got {', '.join(twice)} both by position and by name")
    values = {**given, **kwargs}
    weights = values.pop("weights", "imagenet")
    return ExtractorSettings.from_kwargs("resolve_extractor", **values).resolve(weights, hardware=hardware)


def signature_with_settings(func) -> inspect.Signature:
    """``func``'s signature with its ``**settings`` spelled out: one keyword-only parameter per setting.

    So ``help()``, editors and ``inspect`` show every extractor setting of a function that takes them
    as ``**settings``.
    """
    P = inspect.Parameter
    params = [p for p in inspect.signature(func).parameters.values() if p.kind is not P.VAR_KEYWORD]
    settings = [P(f.name, P.KEYWORD_ONLY, default=f.default) for f in ExtractorSettings.options()]
    return inspect.Signature([*params, *settings])
