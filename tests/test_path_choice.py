"""The "auto" path chosen by measurement (fracfeat._path_choice): real VGG16 weights at 32 px, real
runners, real subprocesses for the CLI, for reuse without timing and for concurrent writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from fracfeat._backbones import backbone_spec, resolve_weights
from fracfeat._config import ExtractorSettings, resolve_extractor
from fracfeat._errors import ConfigError
from fracfeat._hardware import Hardware, choose_precision_and_runtime
from fracfeat._path_choice import (
    CACHE_FILE, ENV, MIN_AUTO_CALIBRATION_SIDE, backbone_key, cached_decision, calibrated_path, candidate_paths,
    choose, decision_key, library_versions, machine_key, read_decisions,
)
from fracfeat.cli import print_calibration

SIZE = 32
SPEC = backbone_spec("vgg16")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, vgg16_weights):
    """`fracfeat calibrate --json` run once in a subprocess into a fresh cache folder: (folder, decision)."""
    cache = tmp_path_factory.mktemp("path-choice-cache")
    env = {**os.environ, "FRACFEAT_CACHE_DIR": str(cache), ENV: "auto", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "fracfeat", "calibrate", "--image-size", str(SIZE), "--weights",
                           str(vgg16_weights), "--images", "8", "--repeats", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache, json.loads(proc.stdout)


@pytest.fixture()
def in_cache(calibrated, monkeypatch):
    monkeypatch.setenv("FRACFEAT_CACHE_DIR", str(calibrated[0]))
    monkeypatch.setenv(ENV, "auto")
    return calibrated[1]


def _key(weights, **backbone_changes):
    settings = ExtractorSettings(backbone="vgg16", image_size=SIZE)
    identity = resolve_weights(SPEC, str(weights)).identity
    return decision_key({**backbone_key(SPEC, SIZE, settings, identity), **backbone_changes})


def test_calibrate_command_times_every_candidate_and_keeps_the_fastest_that_agrees(calibrated, capsys):
    cache, decision = calibrated
    rows = decision["rows"]
    assert [(r["precision"], r["runtime"]) for r in rows] == candidate_paths()
    assert all(r["images_per_s"] > 0 and len(r["runs_s"]) == 2 and r["agrees"] for r in rows), rows
    fastest = max(rows, key=lambda r: r["images_per_s"])
    assert decision["chosen"] == fastest["path"]
    assert decision["key"]["machine"] == machine_key() and decision["key"]["versions"] == library_versions()
    assert decision["cache_file"] == str(cache / CACHE_FILE)
    assert list(read_decisions(cache / CACHE_FILE).values())[0]["chosen"] == decision["chosen"]
    print_calibration(decision)
    table = capsys.readouterr().out
    assert f"{decision['chosen']} " in table and "*" in table.splitlines()[2 + rows.index(fastest)]


def test_auto_reuses_the_cached_decision_without_timing(in_cache, vgg16_weights, calibrated):
    """A fresh process resolves "auto" to the cached choice without importing TensorFlow (no timing),
    and leaves the cache file as it was; so does this process, run after run."""
    before = (calibrated[0] / CACHE_FILE).read_bytes()
    code = ("import sys; from fracfeat._config import resolve_extractor; "
            f"c, _ = resolve_extractor('vgg16', {str(vgg16_weights)!r}, {SIZE}); "
            "print(c.precision + '/' + c.runtime, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, cwd=REPO,
                         timeout=120)
    assert out.stdout.split() == [in_cache["chosen"], "False"], out.stderr[-2000:]
    for _ in range(2):
        config, _ = resolve_extractor("vgg16", str(vgg16_weights), SIZE)
        assert f"{config.precision}/{config.runtime}" == in_cache["chosen"]
    assert (calibrated[0] / CACHE_FILE).read_bytes() == before


def test_forcing_each_candidate_keeps_it_and_forcing_one_side_filters_the_measured_rows(in_cache, vgg16_weights):
    for row in in_cache["rows"]:
        config, _ = resolve_extractor("vgg16", str(vgg16_weights), SIZE, precision=row["precision"],
                                      runtime=row["runtime"])
        assert (config.precision, config.runtime) == (row["precision"], row["runtime"])
    for side in ("precision", "runtime"):
        for value in {r[side] for r in in_cache["rows"]}:
            config, _ = resolve_extractor("vgg16", str(vgg16_weights), SIZE, **{side: value})
            best = max((r for r in in_cache["rows"] if r[side] == value), key=lambda r: r["images_per_s"])
            assert f"{config.precision}/{config.runtime}" == best["path"]


def test_a_path_that_disagrees_is_never_chosen(in_cache):
    rows = in_cache["rows"]
    # Real rows under a bound only float32 meets (bfloat16 rounds its activations: cosine ~0.9999).
    strict = choose(rows, min_cosine=1 - 1e-6)
    assert strict is not None and strict["precision"] == "float32"
    fastest_first = sorted(rows, key=lambda r: -r["images_per_s"])
    disagreeing = [dict(fastest_first[0], min_cosine=0.99), *fastest_first[1:]]
    assert choose(disagreeing)["path"] != fastest_first[0]["path"]
    assert choose([dict(r, min_cosine=0.5) for r in rows]) is None  # nothing agrees: the tables decide


def test_a_changed_library_version_recalibrates_and_a_changed_cpu_misses(in_cache, vgg16_weights, monkeypatch):
    monkeypatch.setenv(ENV, "always")  # first use at 32 px calibrates
    key = _key(vgg16_weights)
    assert cached_decision(key)["chosen"] == in_cache["chosen"]
    for changed in ({"cpu": "Another CPU"}, {"cpu_flags": ["avx2"]}, {"cores": 64}):
        assert cached_decision(decision_key(key["backbone"], {**key["machine"], **changed})) is None
    versions = {**key["versions"], "openvino": "2000.0.0"}
    assert cached_decision(decision_key(key["backbone"], versions=versions)) is None
    chosen = calibrated_path(SPEC, "auto", "auto", settings=ExtractorSettings(image_size=SIZE), image_size=SIZE,
                             weights=str(vgg16_weights), resolved=resolve_weights(SPEC, str(vgg16_weights)),
                             identity=None, versions=versions)
    new = cached_decision(decision_key(key["backbone"], versions=versions))
    assert new is not None and new["measured_at"] >= in_cache["measured_at"]
    assert chosen == tuple(new["chosen"].split("/"))
    assert cached_decision(key)["measured_at"] == in_cache["measured_at"]  # the old key's entry stays


def test_concurrent_writers_leave_a_valid_cache_with_every_entry(tmp_path):
    code = ("import sys; from fracfeat._path_choice import record_decision\n"
            "for i in range(15):\n"
            "    record_decision({'key': {'writer': sys.argv[1], 'i': i}, 'rows': [], 'chosen': ''})\n")
    env = {**os.environ, "FRACFEAT_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], env=env, cwd=REPO) for w in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    assert sorted((d["key"]["writer"], d["key"]["i"]) for d in data["decisions"].values()) == \
        sorted((str(w), i) for w in range(3) for i in range(15))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{CACHE_FILE}")]  # no temp file left


def test_where_calibrating_is_not_worth_it_auto_keeps_the_tables(tmp_path, monkeypatch, vgg16_weights):
    """Random weights, inputs under MIN_AUTO_CALIBRATION_SIDE, a forced side, FRACFEAT_CALIBRATE=off: the
    hand tables' answer, and nothing measured or written."""
    monkeypatch.setenv("FRACFEAT_CACHE_DIR", str(tmp_path))
    table = choose_precision_and_runtime(SPEC, "auto", "auto", Hardware.detect())
    monkeypatch.setenv(ENV, "always")
    config, _ = resolve_extractor("vgg16", None, 224)
    assert (config.precision, config.runtime) == table
    monkeypatch.setenv(ENV, "auto")
    config, _ = resolve_extractor("vgg16", str(vgg16_weights), MIN_AUTO_CALIBRATION_SIDE - 32)
    assert (config.precision, config.runtime) == table
    config, _ = resolve_extractor("vgg16", str(vgg16_weights), 224, precision="float32")
    assert config.precision == "float32"
    assert not (tmp_path / CACHE_FILE).exists()


def test_off_ignores_a_cached_decision_and_a_bad_mode_is_one_clear_error(in_cache, vgg16_weights, monkeypatch):
    table = choose_precision_and_runtime(SPEC, "auto", "auto", Hardware.detect())
    monkeypatch.setenv(ENV, "off")
    config, _ = resolve_extractor("vgg16", str(vgg16_weights), SIZE)
    assert (config.precision, config.runtime) == table
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ConfigError, match="FRACFEAT_CALIBRATE='sometimes' is not one of auto, always, off"):
        resolve_extractor("vgg16", str(vgg16_weights), SIZE)


def test_an_unwritable_cache_folder_keeps_the_tables_with_a_warning(tmp_path, monkeypatch, vgg16_weights, caplog):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FRACFEAT_CACHE_DIR", str(not_a_folder))
    monkeypatch.setenv(ENV, "always")
    table = choose_precision_and_runtime(SPEC, "auto", "auto", Hardware.detect())
    config, _ = resolve_extractor("vgg16", str(vgg16_weights), SIZE)
    assert (config.precision, config.runtime) == table
    assert "set FRACFEAT_CACHE_DIR to a writable folder" in caplog.text
