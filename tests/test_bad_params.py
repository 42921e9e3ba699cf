"""Bad parameters users can pass: each a clear error naming the problem and the fix, before any heavy work."""

from __future__ import annotations

import sys

import pytest

from conftest import TINY
from fracfeat import ConfigError, SourceError, WeightsError, extract


@pytest.fixture()
def one_image(real_images) -> list[str]:
    return [str(real_images["fractured"][0])]


@pytest.mark.parametrize(
    "params, error, message",
    [
        (dict(backbone="vgg19"), ConfigError, r"unknown backbone 'vgg19': choose one of vgg16, resnet50, efficientnetb2"),
        (dict(image_size=16), ConfigError, r"image_size=16 is below vgg16's minimum of 32 pixels.*pass image_size >= 32"),
        (dict(image_size=32.5), ConfigError, r"image_size must be an integer number of pixels, not 32.5"),
        (dict(image_size="big"), ConfigError, r"image_size must be an integer number of pixels, not 'big'"),
        (dict(pooling="mean"), ConfigError, r"pooling='mean': choose one of avg, max, none"),
        (dict(precision="int8"), ConfigError, r"precision='int8': choose one of auto, float32"),
        (dict(truncated="skip"), ConfigError, r"truncated='skip': choose one of read, reject"),
        (dict(batch_size=0), ConfigError, r"batch_size=0: give a positive integer"),
        (dict(checkpoint_every=0), ConfigError, r"checkpoint_every=0: give a positive integer"),
        (dict(weights="/nonexistent/vgg16.h5"), WeightsError, r"weights file '/nonexistent/vgg16.h5' not found: pass"),
    ],
)
def test_bad_setting_is_refused_before_keras_loads(one_image, tmp_path, params, error, message):
    settings = {**TINY, **params}
    with pytest.raises(error, match=message):
        extract(one_image, store=tmp_path / "store", **settings)
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_bad_settings_do_not_import_keras(tmp_path, one_image, python, subprocess_env):
    import subprocess

    code = ("import sys, fracfeat\n"
            "try:\n    fracfeat.extract(sys.argv[1:], backbone='vgg19', store=sys.argv[1] + '.store')\n"
            "except fracfeat.ConfigError:\n    pass\n"
            "print('keras' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([python, "-c", code, *one_image], env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr


@pytest.mark.parametrize("make, message", [
    (lambda d: d, r"holds no images \(looked for"),  # an empty folder
    (lambda d: [(d / "fractured").mkdir(), (d / "not_fractured").mkdir(), d][-1], r"holds no images"),
    (lambda d: [(d / "m.csv").write_text("path,label\n"), d / "m.csv"][-1], r"holds no images"),
    (lambda d: [], r"holds no images"),
])
def test_empty_source(tmp_path, make, message):
    d = tmp_path / "src"
    d.mkdir()
    with pytest.raises(SourceError, match=message):
        extract(make(d), store=tmp_path / "store", **TINY)


def test_missing_source_says_what_to_pass(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist: pass a folder of images, a CSV manifest, or a list"):
        extract(tmp_path / "nowhere", store=tmp_path / "store", **TINY)


def test_csv_without_path_column(tmp_path, one_image):
    csv = tmp_path / "manifest.csv"
    csv.write_text(f"picture,label\n{one_image[0]},fractured\n")
    with pytest.raises(SourceError, match=r"manifest\.csv: no path column\. Found columns \['picture', 'label'\]; "
                                          r"name the column of image paths one of \['path'"):
        extract(csv, store=tmp_path / "store", **TINY)


def test_unmappable_labels(tmp_path, one_image):
    import shutil

    folder = tmp_path / "dataset"
    (folder / "broken").mkdir(parents=True)
    shutil.copy(one_image[0], folder / "broken")
    with pytest.raises(SourceError, match=r"cannot tell whether class 'broken' means fractured or not fractured.*"
                                          r"class_map=\{'broken': 1 or 0"):
        extract(folder, store=tmp_path / "store", **TINY)
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,label\n{one_image[0]},maybe\n")
    with pytest.raises(SourceError, match=r"m\.csv, line 2: cannot tell whether class 'maybe'"):
        extract(csv, store=tmp_path / "store", **TINY)
    with pytest.raises(SourceError, match=r"labels\[0\] = 2: use 1 \(fractured\), 0 \(not fractured\) or -1"):
        extract(one_image, labels=[2], store=tmp_path / "store", **TINY)
    with pytest.raises(SourceError, match=r"class_map\['broken'\] = 'yes': labels must be 1 \(fractured\) or 0"):
        extract(folder, class_map={"broken": "yes"}, store=tmp_path / "store", **TINY)
    with pytest.raises(SourceError, match=r"labels has 2 entries but there are 1 paths; give one per path"):
        extract(one_image, labels=[1, 0], store=tmp_path / "store", **TINY)
