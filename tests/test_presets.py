"""Named presets: every one in the table is valid, explicit keywords win, and fit refuses other features."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import replace

import pytest

import fracfeat
from fracfeat import ConfigError, Preset, extract, fit, run
from fracfeat._config import resolve_extractor
from fracfeat._extract import join_parts
from fracfeat._fit import check_tuning
from fracfeat._presets import PRESETS

from conftest import REPO

NAME = "fracatlas-vgg16-svm"
# A preset matching the tiny test features, so fit with it runs in a second.
TINY_PRESET = Preset(name="tiny", description="test settings", extract=dict(backbone="vgg16", image_size=32,
                     pooling="avg"), fit=dict(classifier="logreg", n_trials=3, cv=3), measured="nowhere")


def _parameters(func) -> set[str]:
    return set(inspect.signature(func).parameters)


@pytest.mark.parametrize("preset", PRESETS.values(), ids=list(PRESETS))
def test_every_preset_in_the_table_is_valid(preset):
    assert preset.description and preset.measured
    assert set(preset.extract) <= _parameters(extract) - {"weights", "store"}
    assert set(preset.fit) <= _parameters(fit) & _parameters(run)
    common = {k: v for k, v in preset.extract.items() if k != "join"}
    parts = join_parts(preset.extract["join"]) if "join" in preset.extract else [{}]  # joined extractors, checked
    for part in parts:
        config, _ = resolve_extractor(**{**common, **part, "weights": None})
        assert config.backbone == preset.extract["backbone"]
    defaults = {k: p.default for k, p in inspect.signature(fit).parameters.items()}
    tuning = {k: preset.fit.get(k, defaults[k]) for k in ("classifier", "n_trials", "cv", "scoring", "threshold")}
    check_tuning(**tuning)


@pytest.mark.parametrize("preset", PRESETS.values(), ids=list(PRESETS))
def test_a_presets_figures_are_in_the_result_file_it_names(preset):
    """No invented figure: every 0.xxx quoted in `measured` is a value of the named benchmark result."""
    path = REPO / preset.measured.split()[0]
    assert path.is_file(), f"{preset.name}: measured names {path}, which does not exist"

    def numbers(obj):
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, list):
            return {n for v in obj for n in numbers(v)}
        return {f"{obj:.3f}"} if isinstance(obj, float) else set()

    quoted = set(re.findall(r"\b0\.\d{3}\b", preset.measured))
    assert quoted and quoted <= numbers(json.loads(path.read_text()))


def test_presets_lists_the_table_and_cannot_change_it():
    listed = fracfeat.presets()
    assert NAME in listed and listed[NAME].extract["backbone"] == "vgg16"
    with pytest.raises(TypeError):
        listed[NAME].fit["n_trials"] = 1
    assert NAME in listed[NAME].describe() and "measured:" in listed[NAME].describe()


def test_a_preset_never_holds_file_locations():
    with pytest.raises(ConfigError, match="weights"):
        Preset(name="x", description="", extract=dict(weights="w.h5"), fit={}, measured="")


@pytest.mark.parametrize("call", [
    lambda: extract([], preset="nope"),
    lambda: fit("no-store", preset="nope"),
    lambda: run("no-source", "out", preset="nope"),
])
def test_unknown_preset_names_the_known_ones(call):
    with pytest.raises(ConfigError, match=f"unknown preset 'nope': choose one of .*{NAME}"):
        call()


def test_fit_refuses_features_of_another_extractor(tiny_features):
    with pytest.raises(ConfigError) as exc:
        fit(tiny_features, preset=NAME)
    message = str(exc.value)
    assert "image_size=32 (the preset's: 224)" in message and "pooling" not in message
    assert f"fracfeat extract SOURCE --store DIR --weights WEIGHTS --preset {NAME}" in message
    with pytest.raises(ConfigError, match="no extractor provenance"):
        fit(replace(tiny_features, provenance={}), preset=NAME)


def test_fit_takes_the_presets_settings_and_explicit_keywords_win(tiny_features):
    result = fit(tiny_features, preset=TINY_PRESET)
    assert result.classifier == "logreg" and result.cv_folds == 3
    assert result.trials["complete"] + result.trials["pruned"] == 3
    result = fit(tiny_features, preset=TINY_PRESET, n_trials=2, cv=2)
    assert result.trials["complete"] + result.trials["pruned"] == 2 and result.cv_folds == 2


def test_extract_takes_the_presets_settings_and_fit_checks_them(tmp_path, real_images):
    paths = real_images["fractured"][:2] + real_images["not_fractured"][:2]
    fs = extract(paths, store=tmp_path / "store", weights=None, progress=False, preset=TINY_PRESET, pooling="max")
    assert (fs.provenance["image_size"], fs.provenance["pooling"]) == (32, "max")
    with pytest.raises(ConfigError, match=r"pooling='max' \(the preset's: 'avg'\)"):
        fit(fs, preset=TINY_PRESET)


def test_run_fills_what_is_not_given_from_the_preset(class_folder, tmp_path):
    result = run(class_folder, tmp_path / "out", preset=NAME, weights=None, image_size=32, n_trials=2, cv=2,
                 progress=False)
    prov = result.features.provenance
    assert (prov["backbone"], prov["image_size"], prov["pooling"]) == ("vgg16", 32, "avg")
    assert result.fit.classifier == "svm" and result.fit.threshold is not None  # the preset's
    assert result.fit.trials["complete"] + result.fit.trials["pruned"] == 2 and result.fit.cv_folds == 2
    summary = json.loads((tmp_path / "out" / "report" / "metrics.json").read_text())["summary"]
    assert summary["preset"] == f"{NAME}, except image_size=32 n_trials=2 cv=2"
