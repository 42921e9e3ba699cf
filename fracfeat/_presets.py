"""Named presets: documented bundles of extractor and tuning settings, each measured by benchmarks/accuracy.py.

``PRESETS`` is the one place a preset's settings and figures live: edit the table to change what a name
means, and every caller (``extract``/``fit``/``run`` with ``preset=``, ``fracfeat presets``) follows.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import MappingProxyType

from ._config import ExtractorSettings
from ._errors import ConfigError

log = logging.getLogger("fracfeat")

SECTIONS = ("extract", "fit")
# File locations differ per machine; a preset names settings, and the caller says where the files are.
_LOCATIONS = ("weights", "store")


@dataclass(frozen=True)
class Preset:
    """A named bundle of settings, measured by ``benchmarks/accuracy.py``.

    Attributes
    ----------
    name : str
    description : str
        What the preset is, in one sentence.
    extract : mapping
        Extractor settings, as :func:`fracfeat.extract` takes them (``backbone``, ``image_size``,
        ``pooling``, ``tiles``...). Never ``weights``: that is a file the caller passes.
    fit : mapping
        Tuning settings, as :func:`fracfeat.fit` takes them (``classifier``, ``n_trials``, ``cv``...).
    measured : str
        Where its figures come from: the benchmark result file and what it says.
    """

    name: str
    description: str
    extract: dict
    fit: dict
    measured: str

    def __post_init__(self):
        located = [k for k in _LOCATIONS if k in self.extract or k in self.fit]
        if located:
            raise ConfigError(f"preset {self.name!r} sets {', '.join(located)}: a preset holds settings, not file "
                              f"locations; leave them out and pass them to the call")
        # Read-only views: changing a returned preset must not change the documented one for everyone.
        for section in SECTIONS:
            object.__setattr__(self, section, MappingProxyType(dict(getattr(self, section))))

    def settings(self, *sections: str) -> dict:
        """The settings of the given sections (default: all) as one plain dict."""
        return {k: v for s in (sections or SECTIONS) for k, v in getattr(self, s).items()}

    def departures(self, settings: dict) -> dict:
        """Settings in ``settings`` that differ from this preset's: ``{name: (given, preset's)}``."""
        mine = self.settings()
        return {k: (v, mine[k]) for k, v in settings.items() if k in mine and v != mine[k]}

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, **{s: self.settings(s) for s in SECTIONS},
                "measured": self.measured}

    def describe(self) -> str:
        """A few lines: name, description, settings, and where the figures come from."""
        lines = [self.name, f"  {self.description}"]
        lines += [f"  {s + ':':<9} {settings_text(getattr(self, s))}" for s in SECTIONS]
        return "\n".join([*lines, f"  measured: {self.measured}"])


def settings_text(settings) -> str:
    """``backbone=vgg16 image_size=224 ...``"""
    return " ".join(f"{k}={v}" for k, v in settings.items())


# The table. Figures are quoted from the result file named in `measured`, nowhere else.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="fracatlas-vgg16-ml34-448-svm",
        description="VGG16 (ImageNet weights), two extractors joined: block3_pool + block4_pool + final features "
                    "average-pooled at 224 px (1,280) beside the final features average-pooled at 448 px (512), a "
                    "tuned RBF SVM, threshold for balanced accuracy. The best measured configuration, and the "
                    "slowest to extract: two store versions, 0.65 s per image on a 2-core CPU (5.18 img/s at 224 px "
                    "+ 2.17 img/s at 448 px; the plain 224 px extractor: 8.08 img/s)",
        extract=dict(backbone="vgg16", pooling="avg",
                     join=(dict(image_size=224, layers=("block3_pool", "block4_pool")), dict(image_size=448))),
        fit=dict(classifier="svm", n_trials=10, cv=3, scoring="roc_auc", threshold="balanced_accuracy"),
        measured="benchmarks/results/accuracy_svm-cat.json (python benchmarks/accuracy.py --methods "
                 "svm-cat-ml34+448 --trials 10 --inner-cv 3), row svm-cat-ml34+448: grouped 5-fold ROC AUC 0.900 "
                 "(0.885-0.913), sensitivity 0.792 at specificity >= 0.85, nested",
    ),
    Preset(
        name="fracatlas-vgg16-ml34-svm",
        description="VGG16 (ImageNet weights) at 224 px, block3_pool + block4_pool + final features average-pooled "
                    "(1,280), a tuned RBF SVM, threshold for balanced accuracy. With run(augment=('hflip',)) "
                    "(--augment hflip) it is the svm-ml34+aug row of benchmarks/results/accuracy_svm-ml34+aug_tta.json "
                    "(ROC AUC 0.897): one extractor, 5.18 img/s on a 2-core CPU (each view costs as much again)",
        extract=dict(backbone="vgg16", image_size=224, pooling="avg", layers=("block3_pool", "block4_pool")),
        fit=dict(classifier="svm", n_trials=10, cv=3, scoring="roc_auc", threshold="balanced_accuracy"),
        measured="benchmarks/results/accuracy_svm-avg_svm-ml34.json (python benchmarks/accuracy.py --methods "
                 "svm-avg,svm-ml34 --trials 10 --inner-cv 3), row svm-ml34: grouped 5-fold ROC AUC 0.892 "
                 "(0.877-0.906), sensitivity 0.775 at specificity >= 0.85, nested",
    ),
    Preset(
        name="fracatlas-vgg16-crop-svm",
        description="VGG16 (ImageNet weights) average-pooled at 224 px on radiographs cropped to their content "
                    "(crop='content'), a tuned RBF SVM, threshold for balanced accuracy: the best of the methods "
                    "benchmarks/external.py compared for another hospital, by its pre-declared rule (the mean of "
                    "HBFMID's and the held-out FracAtlas regions' ROC AUC, FracAtlas CV within 0.01 of the "
                    "baseline's). Its gain over the plain extractor is inside the intervals, and it does not rank "
                    "HBFMID well: check it on your own images (README, 'Radiographs from another hospital')",
        extract=dict(backbone="vgg16", image_size=224, pooling="avg", crop="content"),
        fit=dict(classifier="svm", n_trials=15, cv=5, scoring="roc_auc", threshold="balanced_accuracy"),
        measured="benchmarks/results/external_crop.json (python benchmarks/external.py --store STORE --methods "
                 "crop --no-loso), row crop: FracAtlas grouped CV ROC AUC 0.874; trained on FracAtlas, HBFMID ROC "
                 "AUC 0.567 (0.395-0.744), sensitivity 0.697 at the kept threshold; held-out FracAtlas regions, "
                 "mean ROC AUC 0.707",
    ),
    Preset(
        name="fracatlas-vgg16-svm",
        description="VGG16 (ImageNet weights) average-pooled at 224 px (512 features), a tuned RBF SVM, threshold "
                    "for balanced accuracy: the plain extractor, 1.6x faster to extract than ml34",
        extract=dict(backbone="vgg16", image_size=224, pooling="avg"),
        fit=dict(classifier="svm", n_trials=10, cv=3, scoring="roc_auc", threshold="balanced_accuracy"),
        measured="benchmarks/results/accuracy_svm-avg_svm-ml34.json (python benchmarks/accuracy.py --methods "
                 "svm-avg,svm-ml34 --trials 10 --inner-cv 3), row svm-avg: grouped 5-fold ROC AUC 0.885 "
                 "(0.870-0.899), sensitivity 0.760 at specificity >= 0.85, nested",
    ),
)}


def presets() -> dict[str, Preset]:
    """The named presets, by name.

    Each :class:`Preset` bundles extractor settings (``.extract``) and tuning settings (``.fit``)
    measured by ``benchmarks/accuracy.py``; ``.measured`` says where its figures come from. Pass a name
    as ``preset=`` to :func:`fracfeat.run`, :func:`fracfeat.fit` or :func:`fracfeat.extract`, or
    ``--preset NAME`` on the command line (``fracfeat presets`` lists them).

    Returns
    -------
    dict of str to Preset

    Examples
    --------
    >>> import fracfeat
    >>> for preset in fracfeat.presets().values():                # doctest: +SKIP
    ...     print(preset.describe())
    """
    return dict(PRESETS)


def get_preset(preset) -> Preset:
    """A Preset from its name (or the Preset itself); ConfigError naming the known ones otherwise."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)} "
                      f"(`fracfeat presets` lists them with their settings)")


def preset_defaults(*sections: str):
    """Decorator: the ``preset=`` named in a call supplies every keyword of ``sections`` the caller left out.

    Keywords the caller passes win, so ``run(src, out, preset=NAME, n_trials=5)`` tunes 5 trials. The
    function keeps its own signature and defaults (which apply without a preset) and still receives
    ``preset``, for checks of its own.
    """
    def decorate(func):
        @functools.wraps(func)
        def call(*args, preset=None, **kwargs):
            if preset is not None:
                chosen = get_preset(preset)
                filled = chosen.settings(*sections)
                given = ", ".join(f"{k}={g!r} (preset: {p!r})" for k, (g, p) in chosen.departures(kwargs).items())
                log.info("preset %s: %s%s", chosen.name, settings_text(filled),
                         f"; given explicitly: {given}" if given else "")
                kwargs = {**filled, **kwargs}
            return func(*args, preset=preset, **kwargs)
        return call
    return decorate


def check_features(preset, fs) -> None:
    """Refuse features not extracted with the preset's extractor settings, naming the ones that differ.

    Tuning on other features would quietly give a model the preset's figures say nothing about.
    """
    chosen = get_preset(preset)
    fix = (f"extract matching features with `fracfeat extract SOURCE --store DIR --weights WEIGHTS --preset "
           f"{chosen.name}` (Python: extract(source, preset={chosen.name!r})), or fit without a preset")
    if not all(part.has_extractor for part in fs.parts):
        raise ConfigError(f"preset {chosen.name!r} needs features that record how they were extracted (a store "
                          f"version); these carry no extractor provenance: {fix}")
    # Resolve the preset's settings as extract would (image_size None -> the backbone's default, ...).
    # Forced precision/runtime and random weights keep this cheap: neither is compared.
    common = {k: v for k, v in chosen.extract.items() if k != "join"}
    wanted_parts = [{**common, **part} for part in chosen.extract.get("join") or [{}]]
    if len(fs.parts) != len(wanted_parts):
        raise ConfigError(f"preset {chosen.name!r} joins the features of {len(wanted_parts)} extractor(s); these "
                          f"features come from {len(fs.parts)}: {fix}")
    differing = []
    for n, (settings, made_by) in enumerate(zip(wanted_parts, fs.parts), 1):
        forced = ExtractorSettings.from_kwargs(f"preset {chosen.name!r}", **{"precision": "float32", "runtime": "keras",
                                                                            **settings})
        wanted, _ = forced.resolve(None)
        made = made_by.config
        differing += [f"{'' if len(wanted_parts) == 1 else f'part {n}: '}{k}={getattr(made, k)!r} "
                      f"(the preset's: {getattr(wanted, k)!r})"
                      for k in settings if hasattr(wanted, k) and getattr(made, k) != getattr(wanted, k)]
    if differing:
        raise ConfigError(f"these features were not extracted with preset {chosen.name!r}'s settings: "
                          f"{', '.join(differing)}; {fix}")
