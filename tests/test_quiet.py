"""TensorFlow's own chatter stays off the terminal; --verbose (DEBUG logging) lets it through.

The subprocesses run without TF_CPP_MIN_LOG_LEVEL (which conftest sets for every other child): the
lines TensorFlow prints while it imports ignore that variable, so the fix must work without it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import warnings

import pytest

from fracfeat._quiet import quiet_native_output

# What TensorFlow, absl, oneDNN and CUDA print: absl's "I0000 00:00:..." headers, and their names.
NATIVE_HEADER = re.compile(r"^[IWEF]\d{4} ")
NATIVE_WORDS = ("onednn", "cuda", "cuinit", "absl", "tensorflow")


def native_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if NATIVE_HEADER.match(line) or any(word in line.lower() for word in NATIVE_WORDS)]


@pytest.fixture()
def bare_env(subprocess_env, tmp_path) -> dict:
    """Environment of a child process as a user's shell has it: no TF_CPP_MIN_LOG_LEVEL, an empty
    OpenVINO cache (so a conversion, which imports TensorFlow, happens in the child)."""
    env = dict(subprocess_env)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["FRACFEAT_CACHE_DIR"] = str(tmp_path / "cache")
    return env


@pytest.fixture()
def three_images(tmp_path, real_images):
    """dataset/{fractured,not_fractured}/ holding 2 + 1 real radiographs."""
    root = tmp_path / "dataset"
    for label, paths in real_images.items():
        (root / label).mkdir(parents=True)
        for p in paths[:2 if label == "fractured" else 1]:
            shutil.copy(p, root / label / p.name)
    return root


@pytest.fixture()
def info_logging():
    """fracfeat's logger at INFO, as without --verbose (conftest's autouse fixture restores it)."""
    logging.getLogger("fracfeat").setLevel(logging.INFO)


def run_fracfeat(python, env, *args):
    return subprocess.run([python, "-m", "fracfeat", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_fd2_output_and_warnings_are_discarded_then_stderr_is_back(capfd, info_logging):
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        with quiet_native_output():
            os.write(2, b"I0000 00:00:1.0 port.cc:153] oneDNN custom operations are on\n")
            warnings.warn("a library's UserWarning", UserWarning)
            logging.getLogger("absl").warning("absl python logging")
    os.write(2, b"ours after the block\n")
    assert capfd.readouterr().err == "ours after the block\n"
    assert escaped == []
    assert not logging.getLogger("absl").disabled


def test_an_exception_propagates_with_stderr_restored(capfd, info_logging):
    with pytest.raises(ZeroDivisionError):
        with quiet_native_output():
            os.write(2, b"native noise\n")
            1 / 0
    os.write(2, b"still here\n")
    assert capfd.readouterr().err == "still here\n"


def test_debug_logging_hides_nothing(capfd):
    logging.getLogger("fracfeat").setLevel(logging.DEBUG)  # the autouse fixture of conftest restores it
    with quiet_native_output():
        os.write(2, b"native line\n")
    assert capfd.readouterr().err == "native line\n"


@pytest.mark.slow
def test_cli_extract_prints_only_fracfeat_lines(python, bare_env, three_images, tmp_path):
    # --runtime keras: TensorFlow is imported and runs the model whatever this machine's "auto" picks.
    r = run_fracfeat(python, bare_env, "extract", three_images, "--store", tmp_path / "store", "--backbone", "vgg16",
                     "--weights", "none", "--image-size", "32", "--runtime", "keras")
    assert r.returncode == 0, r.stderr
    assert "3 images" in r.stdout
    assert native_lines(r.stderr) == [], r.stderr
    assert "3 to compute" in r.stderr  # our own messages still show


@pytest.mark.slow
def test_python_api_prints_nothing_through_an_openvino_conversion(python, bare_env, three_images, tmp_path):
    """A library must not spray native lines either: the API (no CLI, no environment variable) is silent,
    through TensorFlow's import, its device probe, the Keras model and the OpenVINO conversion."""
    pytest.importorskip("openvino")
    code = (f"from fracfeat import extract\n"
            f"fs = extract({str(three_images)!r}, store={str(tmp_path / 'store')!r}, backbone='vgg16', weights=None,"
            f" image_size=32, runtime='openvino', precision='float32', progress=False)\n"
            f"print(fs.X.shape)")
    r = subprocess.run([python, "-c", code], env=bare_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(3, 512)"
    assert r.stderr == ""


@pytest.mark.slow
def test_verbose_shows_what_tensorflow_prints(python, bare_env, three_images, tmp_path):
    raw = subprocess.run([python, "-c", "import tensorflow"], env=bare_env, capture_output=True, text=True,
                         timeout=300)
    # absl's header carries a timestamp and thread id; the text after "file.cc:N] " is the same each run.
    messages = [line.split("] ", 1)[1] for line in raw.stderr.splitlines() if NATIVE_HEADER.match(line)]
    r = run_fracfeat(python, bare_env, "extract", three_images, "--store", tmp_path / "store", "--weights", "none",
                     "--image-size", "32", "--runtime", "keras", "--verbose")
    assert r.returncode == 0, r.stderr
    for message in messages:  # none on a machine where TensorFlow imports silently
        assert message in r.stderr, (message, r.stderr)
