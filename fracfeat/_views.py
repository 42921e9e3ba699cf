"""Augmented views: fixed transforms of a radiograph, applied after decoding and before resizing.

The training recipes users start from augment with flips, small rotations and resized crops. With
frozen features that means extracting each view as its own store entry (``extract(view="hflip")``,
its own fingerprint, so the cache keeps views apart) and training on the original rows plus their
views (``fit(augment=[...])``): a view shares its original's id and group, so it never lands on the
other side of a fold. Views are deterministic, so they are cached and reproducible like any feature.

Names:

- ``"hflip"``: mirrored left-right.
- ``"rot+N"`` / ``"rot-N"``: rotated N degrees (1 to 45) counter-clockwise (+) or clockwise (-) about
  the centre, same canvas, corners filled black.
- ``"cropF"``: the central F (0.5 to 0.95) of the width and height, resized to the input size: a zoom
  that gives the middle of the radiograph 1/F times more pixels. JPEGs are decoded at a size large
  enough that the crop keeps full detail.
"""

from __future__ import annotations

import re

from ._errors import ConfigError

_ROT = re.compile(r"^rot([+-])(\d+(?:\.\d+)?)$")
_CROP = re.compile(r"^crop(0?\.\d+)$")
EXAMPLES = "'hflip', 'rot+10', 'rot-10' or 'crop0.8'"


def check_view(view) -> str:
    """The canonical name of a view ("" for the image as it is), or a ConfigError naming the fix."""
    if view is None or view == "" or view == "none":
        return ""
    if not isinstance(view, str):
        raise ConfigError(f"view={view!r}: give a view name such as {EXAMPLES}")
    v = view.strip().lower()
    if v == "hflip":
        return v
    m = _ROT.match(v)
    if m:
        angle = float(m.group(2))
        if not 1 <= angle <= 45:
            raise ConfigError(f"view={view!r}: rotate by 1 to 45 degrees, e.g. 'rot+10'")
        return f"rot{m.group(1)}{angle:g}"
    m = _CROP.match(v)
    if m:
        frac = float(m.group(1))
        if not 0.5 <= frac <= 0.95:
            raise ConfigError(f"view={view!r}: crop between 0.5 and 0.95 of each side, e.g. 'crop0.8'")
        return f"crop{frac:g}"
    raise ConfigError(f"view={view!r} is not a view fracfeat knows; give {EXAMPLES} (or none)")


def decode_scale(view: str) -> float:
    """How much larger than the input size a file must be decoded for this view to keep full detail."""
    m = _CROP.match(view)
    return 1.0 / float(m.group(1)) if m else 1.0


def apply_view(img, view: str):
    """The view of a decoded RGB PIL image (the image itself for view "")."""
    if not view:
        return img
    from PIL import Image, ImageOps

    if view == "hflip":
        return ImageOps.mirror(img)
    m = _ROT.match(view)
    if m:
        angle = float(m.group(2)) * (1 if m.group(1) == "+" else -1)
        return img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    frac = float(_CROP.match(view).group(1))
    w, h = img.size
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))
