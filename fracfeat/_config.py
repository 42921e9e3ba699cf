"""The extractor configuration: everything that changes the numbers, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

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

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of every field: rows are reused only under an identical one."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


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
