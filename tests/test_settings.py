"""ExtractorSettings is the one home of extractor options: every consumer takes its parameters from it."""

from __future__ import annotations

import inspect
import subprocess

import pytest

from fracfeat import ConfigError, DeepFeatures, ExtractorSettings, extract, run
from fracfeat._config import ExtractorConfig, options_text
from fracfeat._extract import join_settings
from fracfeat.cli import build_parser

NAMES = ExtractorSettings.names()


def test_every_setting_is_a_parameter_of_extract_and_deepfeatures():
    assert set(NAMES) <= set(inspect.signature(extract).parameters)
    deep = list(inspect.signature(DeepFeatures).parameters)
    assert deep[:2] == ["backbone", "weights"] and set(NAMES) <= set(deep)
    assert set(DeepFeatures().get_params()) == {*NAMES, "weights", "weights_identity", "batch_size", "workers"}
    assert "**extract_options" in str(inspect.signature(run))  # run passes them on to extract


def test_every_setting_is_a_command_line_option():
    actions = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["extract"]._actions}
    assert set(NAMES) <= actions
    run_actions = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions}
    assert set(NAMES) - {"view"} <= run_actions and "view" not in run_actions  # run takes views as --augment


def test_join_parts_may_change_every_setting_but_the_calls_own():
    assert set(join_settings()) == set(NAMES) - {"truncated", "view"}


def test_unknown_settings_are_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown setting.*tile_size.*backbone, image_size"):
        extract(["x.jpg"], tile_size=3)


def test_settings_round_trip_through_provenance():
    settings = ExtractorSettings(image_size=32, precision="float32", runtime="keras", tiles=2, layers="block4_pool",
                                 view="hflip")
    config, _ = settings.resolve(None)
    back = ExtractorConfig.from_provenance({**config.as_dict(), "fingerprint": config.fingerprint})
    assert back == config and back.settings().resolve(None)[0] == config
    assert options_text(config.as_dict()) == "tiles=2 layers=block4_pool view=hflip"
    assert settings.given() == {"image_size": 32, "precision": "float32", "runtime": "keras", "tiles": 2,
                                "layers": "block4_pool", "view": "hflip"}


def test_a_model_saved_before_a_setting_existed_loads_at_its_default(tmp_path):
    import pickle

    deep = DeepFeatures(weights=None, image_size=32, precision="float32", runtime="keras").fit()
    state = deep.__getstate__()
    del state["view"]  # as if saved by a version without the view setting
    restored = DeepFeatures.__new__(DeepFeatures)
    restored.__setstate__(state)
    assert restored.view is None and restored.fit().fingerprint_ == deep.fingerprint_
    assert pickle.loads(pickle.dumps(restored)).get_params() == deep.get_params()


def test_cli_help_shows_each_settings_help_and_default(python, subprocess_env):
    out = subprocess.run([python, "-m", "fracfeat", "extract", "--help"], capture_output=True, text=True,
                         env=subprocess_env, check=True).stdout
    for name in NAMES:
        assert f"--{name.replace('_', '-')}" in out
    assert "(default: vgg16)" in out and "(default: 1)" in out
