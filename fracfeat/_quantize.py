"""int8 extraction: a backbone quantized once from the user's own images, then used like a weights file.

:func:`quantize` decodes a deterministic sample of the images with the extractor's own decode recipe,
converts the float32 feature model to OpenVINO (the conversion and cache of :mod:`fracfeat._runtimes`),
quantizes it with NNCF's post-training quantization, and writes a folder: model.xml, model.bin and
quantization.json (the float32 extractor it came from, the calibration images' sha256s, the NNCF
options and versions, and the model's identity ``int8:sha256:<hex>`` of model.xml + model.bin).

The setting ``quantized=DIR`` (:class:`fracfeat.ExtractorSettings`) then makes precision "int8" on
OpenVINO: :func:`resolve_quantized` verifies the folder byte for byte and against the extractor the
settings make, and keeps a copy in the cache by identity (:func:`fracfeat._runtimes.keep_quantized`),
where the int8 runner, a store version's extractor and a saved Pipeline find it on this machine. The
identity, not the path, is in the fingerprint: an int8 version is its own store entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ._config import ExtractorConfig, ExtractorSettings
from ._deps import require
from ._engine import FeatureEngine
from ._errors import ConfigError, MissingDependencyError, WeightsError
from ._extract import hash_files
from ._runtimes import (INT8_FORMAT, INT8_IDENTITY, QUANTIZATION_FILE, build_feature_model, float32_openvino_model,
                        keep_quantized, kept_quantized, quantized_identity, read_quantized)
from ._sources import load_records
from ._store import utc_now

log = logging.getLogger("fracfeat")

DEFAULT_IMAGES = 300
MIN_IMAGES = 32  # fewer usable calibration images leave NNCF's activation ranges to chance
PRESETS = ("performance", "mixed")
# Left in float: NNCF 3.4's int8 depthwise convolutions (EfficientNet's) quantize their weights per channel
# through the converted graph's Transposes, and OpenVINO 2026.4's CPU plugin then refuses to compile the
# model ("FakeQuantize ... doesn't support non per-tensor quantization for axis: 2").
IGNORED_TYPES = ("GroupConvolution",)
# Settings quantize decides itself (the int8 model's source is float32 OpenVINO), or that a single
# quantized model cannot serve (scales= runs the backbone at several input sizes).
NOT_SETTINGS = ("precision", "runtime", "quantized", "scales", "view")


def source_config(config: ExtractorConfig) -> ExtractorConfig:
    """The float32 extractor an int8 model of ``config`` is quantized from: what changes the model and its
    calibration pixels (backbone, size, weights, pooling, layers, crop, intensity...), not the precision,
    runtime, tiling, view or truncated-file policy, which the same model serves."""
    return dataclasses.replace(config, precision="float32", runtime="openvino", quantized="", tiles=1, scales=(),
                               view="", truncated="read")


def require_nncf(module: str = "nncf"):
    """NNCF, or a MissingDependencyError naming ``pip install 'fracfeat[int8]'``."""
    try:
        return require(module, why="`fracfeat quantize` (precision int8)")
    except MissingDependencyError as e:
        raise MissingDependencyError(f"{str(e).split('. Install it:')[0]}. Install it: pip install 'fracfeat[int8]' "
                                     f"(or: pip install nncf)") from None


@contextlib.contextmanager
def nncf_quietly(nncf):
    """NNCF's INFO lines and its progress bars (rich, on stdout) kept off the user's terminal during the block;
    shown as they come when the fracfeat logger is at DEBUG (``fracfeat --verbose``)."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf.set_log_level(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_log.setLevel(level)


def resolve_quantized(value, config: ExtractorConfig) -> str:
    """The identity of ``quantized=`` (a folder, or an ``int8:sha256:`` identity kept in the cache), once
    it is verified and made from the extractor ``config`` resolves to; a WeightsError otherwise."""
    if config.scales:
        raise ConfigError("quantized= runs one int8 model at one input size, not scales=: drop scales= (or quantized=)")
    text = os.fspath(value)
    if text.startswith(INT8_IDENTITY):
        folder, record = kept_quantized(text)
    else:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise WeightsError(f"quantized={text!r}: no such folder: pass the folder `fracfeat quantize IMAGES --out "
                               f"DIR` wrote (a model moved to another machine: its folder there)")
        record = read_quantized(folder)
    source = source_config(config)
    if record.get("float32_fingerprint") != source.fingerprint:
        made = record.get("extractor", {})
        differ = [f"{k}={made.get(k)!r} there, {v!r} here" for k, v in source.as_dict().items() if made.get(k) != v]
        raise WeightsError(f"quantized={text!r} was made from another extractor ({'; '.join(differ) or 'other code'}): "
                           f"quantize again for these settings (fracfeat quantize IMAGES --out DIR with the same "
                           f"--backbone, --weights and options)")
    keep_quantized(folder, record)
    return record["identity"]


def calibration_sample(images, config: ExtractorConfig, resolved, n: int) -> tuple[np.ndarray, dict]:
    """Up to ``n`` decoded images: the files of smallest content sha256 that decode (the same sample for
    the same image set in any order, duplicates once), and the record of which were used or failed.
    ``images``: what :func:`fracfeat.extract` takes, or its records and description already loaded."""
    records, description = images if isinstance(images, tuple) else load_records(images)
    hashed = {}
    unreadable = 0
    for record, (digest, reason) in zip(records, hash_files([r.path for r in records])):
        if digest is None:
            unreadable += 1
        else:
            hashed.setdefault(digest, record.path)
    order = sorted(hashed)
    engine = FeatureEngine(config, resolved)
    pixels, used, failed = [], [], unreadable
    for i, decoded in engine.iter_decoded([hashed[d] for d in order], sha256s=order, lookahead=16):
        if decoded.pixels is None:
            failed += 1
            continue
        pixels.append(decoded.pixels)
        used.append({"sha256": order[i], "path": hashed[order[i]]})
        if len(pixels) == n:
            break
    if len(pixels) < min(n, MIN_IMAGES):
        raise ConfigError(f"quantize found {len(pixels)} usable images in {description} ({failed} failed to read or "
                          f"decode): int8 calibration needs at least {min(n, MIN_IMAGES)}; pass more images (a few "
                          f"hundred of the kind you will extract)")
    return np.stack(pixels), {"source": description, "n_requested": n, "n_used": len(used), "n_failed": failed,
                              "n_candidates": len(order), "sample": "smallest content sha256 first", "images": used}


def quantize(images, out, *, backbone: str = "vgg16", weights="imagenet", n: int = DEFAULT_IMAGES,
             preset: str = "performance", fast_bias_correction: bool = True, subset_size: int | None = None,
             **settings) -> dict:
    """Quantize a backbone's feature model to int8 from your images; write it to the folder ``out``.

    Parameters
    ----------
    images : folder, CSV manifest, or list of image paths
        Images of the kind you will extract (labels are not used). Up to ``n`` of them calibrate.
    out : path
        A new (or empty) folder: model.xml, model.bin and quantization.json are written there atomically.
    backbone, weights, **settings
        The extractor, as :func:`fracfeat.extract` takes it (not precision, runtime, quantized, scales, view).
    n : int
        Calibration images: the ``n`` of smallest content sha256 that decode.
    preset : "performance" or "mixed"
        NNCF's quantization preset (symmetric activations, or asymmetric ones).
    fast_bias_correction : bool
        NNCF's fast bias correction (False: its slower full bias correction).
    subset_size : int, optional
        Images NNCF takes its statistics from (default: every calibration image).

    Returns
    -------
    dict
        The content of quantization.json; ``record["identity"]`` is the model's ``int8:sha256:<hex>``.

    Examples
    --------
    >>> fracfeat.quantize("radiographs/", "vgg16-int8", weights="vgg16_notop.weights.h5")  # doctest: +SKIP
    >>> fracfeat.extract("radiographs/", store="store", weights="vgg16_notop.weights.h5",
    ...                  quantized="vgg16-int8")                                          # doctest: +SKIP
    """
    clash = sorted(set(settings) & set(NOT_SETTINGS))
    if clash:
        raise ConfigError(f"quantize does not take {', '.join(clash)}: the int8 model is quantized from float32 "
                          f"OpenVINO at one input size; pass precision/runtime to extract, not here")
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: choose one of {', '.join(PRESETS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n={n!r}: give the number of calibration images, e.g. {DEFAULT_IMAGES}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"quantize --out {str(out)!r} exists and is not an empty folder: pass a new folder, or "
                          f"delete that one first")
    nncf = require_nncf()
    t0 = time.perf_counter()
    images = load_records(images)  # a wrong source fails before the weights are read
    chosen = ExtractorSettings.from_kwargs("quantize", backbone=backbone, **settings)
    config, resolved = chosen.replace(precision="float32", runtime="openvino").resolve(weights)
    config = source_config(config)
    pixels, calibration = calibration_sample(images, config, resolved, int(n))
    ov_model, traced_with = float32_openvino_model(config, lambda: build_feature_model(config, resolved))
    options = {"preset": preset, "fast_bias_correction": bool(fast_bias_correction),
               "subset_size": int(subset_size or len(pixels)), "model_type": None, "ignored_types": list(IGNORED_TYPES)}
    log.info("quantizing %s at %d px on %d images (NNCF %s)", config.backbone, config.image_size, len(pixels),
             nncf.__version__)
    with nncf_quietly(nncf):
        quantized = nncf.quantize(ov_model, nncf.Dataset([p[None] for p in pixels]),
                                  preset=getattr(nncf.QuantizationPreset, preset.upper()),
                                  fast_bias_correction=options["fast_bias_correction"],
                                  subset_size=options["subset_size"],
                                  ignored_scope=nncf.IgnoredScope(types=list(IGNORED_TYPES), validate=False))
    record = {"format": INT8_FORMAT[0], "format_version": INT8_FORMAT[1], "created": utc_now(),
              "float32_fingerprint": config.fingerprint, "extractor": config.as_dict(), "settings": chosen.given(),
              "weights_kind": resolved.kind, "weights_path": resolved.path or "", "calibration": calibration,
              "nncf_version": nncf.__version__, "openvino_version": traced_with.get("openvino_version", ""),
              "traced_with": {k: v for k, v in traced_with.items() if k != "openvino_version"},
              "nncf_options": options}
    record = _write_folder(quantized, record, out)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    keep_quantized(out, record)
    log.info("wrote %s (%s) in %.0f s", out, record["identity"][:28], record["seconds"])
    return record


def _write_folder(model, record: dict, out: Path) -> dict:
    """model.xml, model.bin and quantization.json (with the files' identity) into ``out``, atomically."""
    ov = require("openvino", why="`fracfeat quantize`")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        record = {**record, "identity": quantized_identity(tmp)}
        (tmp / QUANTIZATION_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        if out.is_dir():
            out.rmdir()  # empty (checked): a rename cannot replace a folder otherwise
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record

