"""int8 extraction: `fracfeat quantize` (NNCF) on real radiographs, the quantized= setting, its errors.

One int8 model is made per module (VGG16 with seeded random weights at 64 px, 8 real images), through
the command line in-process; the other tests extract with it, fit on it, load it in a fresh process,
and damage copies of its folder. Correctness only: these hold on any x86-64 CPU (no speed is checked).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import shutil
import subprocess

import joblib
import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from conftest import manifest_rows  # noqa: E402

from fracfeat import (ConfigError, DeepFeatures, MissingDependencyError, WeightsError, calibrate, extract,  # noqa: E402
                      quantize)
from fracfeat import cli  # noqa: E402
from fracfeat._path_choice import MIN_COSINE, cosine_per_image  # noqa: E402
from fracfeat._quantize import calibration_sample, require_nncf, source_config  # noqa: E402
from fracfeat._runtimes import quantized_identity  # noqa: E402

SMALL = dict(backbone="vgg16", weights=None, image_size=64)


@pytest.fixture(scope="module")
def images(fracatlas) -> list[str]:
    rows = [r for r in manifest_rows() if r["use"] == "1"]
    return [str(fracatlas / r["path"]) for r in rows[:4] + rows[-4:]]


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, images):
    """The folder `fracfeat quantize` writes for SMALL on the 8 images (listed in a CSV manifest)."""
    root = tmp_path_factory.mktemp("int8")
    manifest = root / "images.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["path"], *([p] for p in images)])
    out = root / "vgg16-int8"
    log = logging.getLogger("fracfeat")
    saved = (list(log.handlers), log.level, log.propagate)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            assert cli.main(["-q", "quantize", str(manifest), "--out", str(out), "--n", "8", "--weights", "none",
                             "--image-size", "64"]) == 0
        (root / "printed.txt").write_text(printed.getvalue())
    finally:  # the CLI's logging set-up, undone (conftest's per-test undo runs after this module fixture)
        log.handlers[:], log.propagate = saved[0], saved[2]
        log.setLevel(saved[1])
    return out


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory, images, int8_dir):
    store = tmp_path_factory.mktemp("int8-store") / "store"
    return extract(images, store=store, quantized=int8_dir, progress=False, **SMALL)


def test_quantize_writes_a_folder_that_names_its_model_and_calibration(int8_dir, images):
    record = json.loads((int8_dir / "quantization.json").read_text())
    assert sorted(p.name for p in int8_dir.iterdir()) == ["model.bin", "model.xml", "quantization.json"]
    assert record["identity"] == quantized_identity(int8_dir)
    cal = record["calibration"]
    assert (cal["n_used"], cal["n_failed"]) == (8, 0)
    sums = [im["sha256"] for im in cal["images"]]
    assert sums == sorted(sums) and sorted(im["path"] for im in cal["images"]) == sorted(images)
    assert record["nncf_version"] and record["openvino_version"] and record["nncf_options"]["preset"] == "performance"
    assert record["extractor"]["precision"] == "float32" and record["extractor"]["image_size"] == 64


def test_quantize_keeps_nncf_progress_bars_and_info_lines_off_the_terminal(int8_dir):
    printed = (int8_dir.parent / "printed.txt").read_text()
    assert "Statistics collection" not in printed and "INFO:nncf" not in printed and "━" not in printed
    written, summary = printed.strip().splitlines()  # fracfeat's own two lines: what was written, and how
    assert written.startswith("int8:sha256:") and written.endswith(str(int8_dir)) and "calibrated on 8" in summary


def test_the_calibration_sample_does_not_depend_on_the_order_of_the_images(int8_dir, images):
    settings = DeepFeatures(**SMALL, precision="float32", runtime="openvino").fit().config_
    _, record = calibration_sample(images[::-1], source_config(settings), None, 5)
    recorded = json.loads((int8_dir / "quantization.json").read_text())["calibration"]["images"]
    assert [im["sha256"] for im in record["images"]] == [im["sha256"] for im in recorded[:5]]


def test_int8_features_are_their_own_store_entry_with_the_calibration_in_provenance(int8_store, int8_dir, images):
    prov = int8_store.provenance
    assert (prov["precision"], prov["runtime"]) == ("int8", "openvino")
    assert prov["quantized"] == quantized_identity(int8_dir) and str(int8_dir) not in prov["quantized"]
    assert prov["quantization"]["calibration"]["n_used"] == 8
    float32 = extract(images, store=int8_store.store, precision="float32", runtime="keras", progress=False, **SMALL)
    assert float32.fingerprint != int8_store.fingerprint and float32.version != int8_store.version
    assert cosine_per_image(int8_store.X, float32.X).min() >= MIN_COSINE["int8"]


CHILD = """
import sys, joblib, numpy as np
pipeline = joblib.load(sys.argv[1])
paths = sys.argv[2:]
np.save(sys.argv[1] + ".features.npy", pipeline[0].transform(paths))
np.save(sys.argv[1] + ".proba.npy", pipeline.predict_proba(paths))
"""


def test_a_saved_int8_pipeline_gives_the_same_features_and_predictions_in_a_fresh_process(
        tmp_path, int8_store, images, python, subprocess_env):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    deep = DeepFeatures.from_provenance(int8_store.provenance)  # quantized= the identity, kept in the cache
    y = np.array([0, 1] * 4)
    pipeline = Pipeline([("features", deep), ("clf", LogisticRegression(max_iter=200))]).fit(images, y)
    path = tmp_path / "int8.joblib"
    joblib.dump(pipeline, path)
    subprocess.run([python, "-c", CHILD, str(path), *images], env=subprocess_env, check=True, timeout=300)
    np.testing.assert_array_equal(np.load(f"{path}.features.npy"), int8_store.X)
    np.testing.assert_array_equal(np.load(f"{path}.proba.npy"), pipeline.predict_proba(images))


def test_a_model_moved_to_another_machine_asks_for_its_folder_and_takes_it(tmp_path, monkeypatch, int8_store,
                                                                             int8_dir, images):
    pipeline = DeepFeatures.from_provenance(int8_store.provenance)
    monkeypatch.setenv("FRACFEAT_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match=r"not on this machine.*set_params\(features__quantized=DIR\)"):
        pipeline.transform(images[:1])
    pipeline.set_params(quantized=str(int8_dir))  # no fit(): the folder is verified and kept when it is used
    np.testing.assert_array_equal(pipeline.transform(images[:2]), int8_store.X[:2])


def test_a_damaged_model_file_is_refused(tmp_path, int8_dir):
    copy = tmp_path / "damaged"
    shutil.copytree(int8_dir, copy)
    data = bytearray((copy / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.bin").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="do not match the sha256"):
        DeepFeatures(**SMALL, quantized=str(copy)).fit()


def test_a_folder_made_for_another_extractor_is_refused(int8_dir):
    with pytest.raises(WeightsError, match="another extractor.*image_size=64 there, 96 here"):
        DeepFeatures(**{**SMALL, "image_size": 96}, quantized=str(int8_dir)).fit()
    with pytest.raises(WeightsError, match="another extractor.*pooling"):
        DeepFeatures(**SMALL, pooling="max", quantized=str(int8_dir)).fit()


@pytest.mark.parametrize("settings, message", [
    (dict(precision="int8"), "needs a quantized model.*fracfeat quantize"),
    (dict(precision="int8", quantized="/no/such/folder"), "no such folder"),
    (dict(runtime="keras", quantized="/no/such/folder"), "OpenVINO only"),
    (dict(precision="bfloat16", quantized="/no/such/folder"), "not precision='bfloat16'"),
])
def test_int8_settings_a_user_can_get_wrong_say_how_to_fix_them(settings, message):
    with pytest.raises((ConfigError, WeightsError), match=message):
        DeepFeatures(**SMALL, **settings).fit()


def test_quantize_refuses_too_few_images_and_a_used_folder(tmp_path, images, int8_dir):
    with pytest.raises(ConfigError, match="found 3 usable images.*at least 32"):
        quantize(images[:3], tmp_path / "few", **SMALL)
    with pytest.raises(ConfigError, match="not an empty folder"):
        quantize(images, int8_dir, **SMALL)


def test_missing_nncf_names_the_extra_to_install():
    with pytest.raises(MissingDependencyError, match=r"pip install 'fracfeat\[int8\]'"):
        require_nncf("fracfeat_no_such_nncf")


def test_calibrate_times_and_checks_the_int8_row_but_auto_never_picks_it(int8_dir):
    decision = calibrate(**SMALL, quantized=str(int8_dir), n_images=4, repeats=1, candidates=[("int8", "openvino")])
    rows = {r["path"]: r for r in decision["rows"]}
    assert set(rows) == {"float32/keras", "int8/openvino"}
    assert rows["int8/openvino"]["images_per_s"] > 0 and rows["int8/openvino"]["agrees"]
    assert decision["chosen"] == "float32/keras"  # int8 agrees and may be faster, but "auto" never picks it


def test_import_fracfeat_does_not_import_nncf(python, subprocess_env):
    code = "import sys, fracfeat; assert 'nncf' not in sys.modules and 'openvino' not in sys.modules"
    subprocess.run([python, "-c", code], env=subprocess_env, check=True, timeout=60)
