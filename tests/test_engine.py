"""The engine's fast paths: same features as float32 Keras, choice of path, fingerprints, OpenVINO cache,
and features that no batch size can change."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from fracfeat import DeepFeatures
from fracfeat._backbones import backbone_spec
from fracfeat._config import resolve_extractor
from fracfeat._engine import FeatureEngine
from fracfeat._errors import ImageError, MissingDependencyError
from fracfeat._hardware import Hardware, choose_precision_and_runtime, keras_chunk_size, preferred_batch_size
from fracfeat._images import load_image

# Small inputs keep these real-backbone tests in seconds; 64 px is above every backbone's minimum.
SIZE = 64

# (precision, runtime) per backbone against float32 Keras: every path "auto" can choose on a CPU
# (OpenVINO float32/bfloat16, Keras bfloat16 for VGG16 on AMX) and on a GPU (Keras bfloat16/float16).
# VGG16 runs with the real ImageNet weights, the others with seeded random weights (none here).
FAST_PATHS = {
    "vgg16": [("float32", "openvino"), ("bfloat16", "openvino"), ("bfloat16", "keras"), ("float16", "keras")],
    "resnet50": [("float32", "openvino"), ("bfloat16", "openvino")],
    "efficientnetb2": [("float32", "openvino"), ("bfloat16", "openvino"), ("bfloat16", "keras")],
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Compiled-model cache per test: no test reads another's (or the user's) cache.
    monkeypatch.setenv("FRACFEAT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def radiographs(real_images) -> np.ndarray:
    paths = real_images["fractured"][:2] + real_images["not_fractured"][:2]
    return np.stack([load_image(str(p), SIZE).pixels for p in paths])


def _weights(backbone, vgg16_weights):
    return str(vgg16_weights) if backbone == "vgg16" else None


def _features(backbone, weights, precision, runtime, pixels, **options):
    config, resolved = resolve_extractor(backbone, weights, SIZE, precision=precision, runtime=runtime, **options)
    assert (config.precision, config.runtime) == (precision, runtime)
    return FeatureEngine(config, resolved).forward(pixels)


def _cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(FAST_PATHS))
def test_every_fast_path_matches_float32_keras_per_image(backbone, radiographs, vgg16_weights):
    weights = _weights(backbone, vgg16_weights)
    reference = _features(backbone, weights, "float32", "keras", radiographs)
    assert np.isfinite(reference).all() and np.abs(reference).sum() > 0
    for precision, runtime in FAST_PATHS[backbone]:
        if runtime == "openvino":
            pytest.importorskip("openvino")
        fast = _features(backbone, weights, precision, runtime, radiographs)
        assert fast.shape == reference.shape and fast.dtype == np.float32
        cos = _cosine(fast, reference)
        assert cos.min() >= 0.999, f"{backbone} {precision}/{runtime}: per-image cosine {np.round(cos, 6)}"


@pytest.mark.slow
def test_openvino_runs_the_multi_layer_model_like_keras(radiographs, vgg16_weights, tmp_path):
    pytest.importorskip("openvino")
    taps = ("block3_pool", "block4_pool")
    fast = _features("vgg16", str(vgg16_weights), "float32", "openvino", radiographs, layers=taps)
    reference = _features("vgg16", str(vgg16_weights), "float32", "keras", radiographs, layers=taps)
    assert fast.shape == reference.shape == (4, 256 + 512 + 512)
    cos = _cosine(fast, reference)
    assert cos.min() >= 0.999, f"per-image cosine {np.round(cos, 6)}"
    # The cache is keyed by the fingerprint: the plain model gets its own entry, not the multi-layer one.
    plain, resolved = resolve_extractor("vgg16", str(vgg16_weights), SIZE, precision="float32", runtime="openvino")
    assert FeatureEngine(plain, resolved).forward(radiographs).shape == (4, 512)
    assert len(list((tmp_path / "cache" / "openvino").glob("*/model.xml"))) == 2


def test_auto_resolves_to_a_concrete_path_for_every_backbone():
    for name in ("vgg16", "resnet50", "efficientnetb2"):
        precision, runtime = choose_precision_and_runtime(backbone_spec(name), "auto", "auto")
        assert precision in ("float32", "bfloat16", "float16") and runtime in ("keras", "openvino")


# Every kind of machine "auto" knows, forced, so each branch runs on whatever machine runs the tests.
CPU = Hardware(openvino=True)
CPU_NO_OPENVINO = Hardware()
CPU_BF16 = Hardware(cpu_bfloat16=True, openvino=True)
CPU_BF16_NO_OPENVINO = Hardware(cpu_bfloat16=True)
GPU_BF16 = Hardware(gpu=True, gpu_bfloat16=True, cpu_bfloat16=True, openvino=True)
GPU_OLD = Hardware(gpu=True, openvino=True)
# (hardware, backbone) -> (precision, runtime) that "auto" must choose.
AUTO_CHOICES = {
    (CPU, "vgg16"): ("float32", "openvino"),
    (CPU, "resnet50"): ("float32", "openvino"),
    (CPU, "efficientnetb2"): ("float32", "keras"),
    (CPU_NO_OPENVINO, "vgg16"): ("float32", "keras"),
    (CPU_NO_OPENVINO, "resnet50"): ("float32", "keras"),
    (CPU_BF16, "vgg16"): ("bfloat16", "keras"),
    (CPU_BF16, "resnet50"): ("bfloat16", "openvino"),
    (CPU_BF16, "efficientnetb2"): ("bfloat16", "openvino"),
    (CPU_BF16_NO_OPENVINO, "resnet50"): ("bfloat16", "keras"),
    (GPU_BF16, "resnet50"): ("bfloat16", "keras"),
    (GPU_OLD, "efficientnetb2"): ("float16", "keras"),
}


@pytest.mark.parametrize("hardware, backbone", list(AUTO_CHOICES), ids=lambda v: getattr(v, "name", None) or str(v))
def test_auto_chooses_the_measured_path_for_each_kind_of_machine(hardware, backbone):
    assert choose_precision_and_runtime(backbone_spec(backbone), "auto", "auto", hardware) == \
        AUTO_CHOICES[hardware, backbone]


@pytest.mark.parametrize("hardware", [CPU, CPU_BF16, GPU_BF16])
def test_a_forced_setting_is_kept_on_every_kind_of_machine(hardware):
    spec = backbone_spec("resnet50")
    assert choose_precision_and_runtime(spec, "float32", "auto", hardware)[0] == "float32"
    assert choose_precision_and_runtime(spec, "auto", "openvino", hardware)[1] == "openvino"
    assert choose_precision_and_runtime(spec, "float16", "keras", hardware) == ("float16", "keras")
    # float32 forced on a bfloat16 CPU takes the float32 runtime table, not the bfloat16 one.
    assert choose_precision_and_runtime(backbone_spec("vgg16"), "float32", "auto", hardware)[1] == \
        ("keras" if hardware.gpu else "openvino")


def test_batch_size_is_large_on_a_gpu_only():
    config, _ = resolve_extractor("vgg16", None, 32, precision="float32", runtime="keras")
    assert preferred_batch_size(config, GPU_BF16) == 256
    assert preferred_batch_size(config, CPU_BF16) == preferred_batch_size(config, CPU) == 32
    ov, _ = resolve_extractor("vgg16", None, 32, precision="float32", runtime="openvino")
    assert preferred_batch_size(ov, GPU_BF16) == 32


def test_detected_hardware_matches_the_cpu_flags():
    # Read the hardware, never assume it: the answer must follow /proc/cpuinfo on this machine.
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    assert Hardware.detect().cpu_bfloat16 == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_forcing_precision_or_runtime_changes_the_fingerprint():
    prints = {}
    for precision in ("float32", "bfloat16", "float16"):
        for runtime in ("keras", "openvino"):
            config, _ = resolve_extractor("vgg16", None, 32, precision=precision, runtime=runtime)
            assert (config.precision, config.runtime) == (precision, runtime)
            prints[precision, runtime] = config.fingerprint
    assert len(set(prints.values())) == len(prints)
    auto, _ = resolve_extractor("vgg16", None, 32)
    assert auto.fingerprint == prints[auto.precision, auto.runtime]


def test_forcing_one_setting_resolves_the_other_around_it():
    assert choose_precision_and_runtime(backbone_spec("resnet50"), "auto", "keras")[1] == "keras"
    assert choose_precision_and_runtime(backbone_spec("resnet50"), "float32", "auto")[0] == "float32"


def test_auto_falls_back_to_keras_with_a_log_line_when_openvino_is_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an interpreter without the package sees
    with caplog.at_level(logging.INFO, logger="fracfeat"):
        config, _ = resolve_extractor("resnet50", None, 32)
    assert config.runtime == "keras"
    assert "OpenVINO is not installed" in caplog.text and "fracfeat[openvino]" in caplog.text


def test_forced_openvino_without_openvino_names_the_install_command(monkeypatch, radiographs):
    monkeypatch.setitem(sys.modules, "openvino", None)
    config, resolved = resolve_extractor("vgg16", None, 32, precision="float32", runtime="openvino")
    with pytest.raises(MissingDependencyError, match=r"fracfeat\[openvino\]"):
        FeatureEngine(config, resolved).forward(radiographs[:, :32, :32])


def test_openvino_model_is_cached_per_fingerprint_and_gives_the_same_features(tmp_path, radiographs, caplog):
    pytest.importorskip("openvino")
    config, resolved = resolve_extractor("vgg16", None, SIZE, precision="float32", runtime="openvino")
    with caplog.at_level(logging.INFO, logger="fracfeat"):
        first = FeatureEngine(config, resolved).forward(radiographs)
    assert "converted vgg16 to OpenVINO" in caplog.text
    cached = list((tmp_path / "cache" / "openvino").glob("*/model.xml"))
    assert len(cached) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fracfeat"):
        engine = FeatureEngine(config, resolved)
        again = engine.forward(radiographs)
    assert "converted" not in caplog.text  # read from the cache, the Keras model never built
    np.testing.assert_array_equal(first, again)
    assert engine.n_features == first.shape[1] == 512


def test_choosing_a_path_on_a_cpu_does_not_import_tensorflow(subprocess_env, python):
    code = ("import sys; from fracfeat._config import resolve_extractor; "
            "c, _ = resolve_extractor('resnet50', None, 32); "
            "print(c.precision, c.runtime, 'tensorflow' in sys.modules)")
    out = subprocess.run([python, "-c", code], env=subprocess_env, capture_output=True, text=True, check=True)
    precision, runtime, imported = out.stdout.split()
    if imported == "True":
        # Only machines with a GPU driver ask TensorFlow; this one must then have one.
        import os

        assert os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")


def test_extract_from_a_cached_openvino_model_never_imports_tensorflow(class_folder, tmp_path, subprocess_env, python):
    pytest.importorskip("openvino")
    subprocess_env["FRACFEAT_CACHE_DIR"] = str(tmp_path / "cache")
    code = ("import sys, json; from fracfeat import extract; "
            f"fs = extract({str(class_folder)!r}, store=sys.argv[1], backbone='vgg16', weights=None, image_size=32, "
            "precision='float32', runtime='openvino', progress=False); "
            "p = fs.provenance; print(json.dumps([p['runtime'], p['openvino_version'], p['keras_version'], "
            "'tensorflow' in sys.modules]))")
    runs = [subprocess.run([python, "-c", code, str(tmp_path / f"store{i}")], env=subprocess_env,
                           capture_output=True, text=True, check=True) for i in range(2)]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first[:3] == second[:3] and first[0] == "openvino" and first[1] and first[2]
    assert first[3] is True and second[3] is False  # converted once, then read from the cache


# Every (precision, runtime) a CPU can run; bfloat16 works on any x86-64 CPU (emulated, slower, without hardware support).
CPU_PATHS = [("float32", "keras"), ("bfloat16", "keras"), ("float32", "openvino"), ("bfloat16", "openvino")]


@pytest.fixture(scope="module")
def seven_files(real_images) -> list[str]:
    return [str(p) for p in real_images["fractured"][:4] + real_images["not_fractured"][:3]]


@pytest.mark.slow
@pytest.mark.parametrize("precision, runtime", CPU_PATHS)
def test_features_do_not_depend_on_the_batch_size(precision, runtime, seven_files):
    # ResNet50: float32 Keras gave other last bits for 1 image a call than for 3 or 7 before every
    # call ran at one fixed shape, so extract (batch 32, 256 on a GPU) and a Pipeline disagreed.
    if runtime == "openvino":
        pytest.importorskip("openvino")
    config, resolved = resolve_extractor("resnet50", None, SIZE, precision=precision, runtime=runtime)
    engine = FeatureEngine(config, resolved)
    features = {}
    for batch_size in (1, 3, 32):
        batches = list(engine.iter_features(seven_files, batch_size=batch_size))
        assert [len(b.indices) for b in batches][0] == min(batch_size, 7)
        features[batch_size] = np.concatenate([b.features for b in batches])
    assert features[32].shape == (7, 2048) and np.abs(features[32]).sum() > 0
    for batch_size in (1, 3):
        np.testing.assert_array_equal(features[batch_size], features[32], err_msg=f"batch_size={batch_size}")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["keras", "openvino"])
def test_deep_features_give_arrays_and_their_files_the_same_features(runtime, seven_files):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    deep = DeepFeatures("resnet50", weights=None, image_size=SIZE, precision="float32", runtime=runtime,
                        batch_size=32).fit()
    from_files = deep.transform(seven_files)
    arrays = np.stack([load_image(p, SIZE).pixels for p in seven_files])
    np.testing.assert_array_equal(deep.transform(arrays), from_files)
    deep.set_params(batch_size=3)  # the same engine, other batches
    np.testing.assert_array_equal(deep.transform(list(arrays)), from_files)
    np.testing.assert_array_equal(deep.transform(seven_files), from_files)


@pytest.mark.parametrize("runtime", ["keras", "openvino"])
def test_an_image_gets_the_same_features_anywhere_in_any_call(runtime, radiographs):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    config, resolved = resolve_extractor("vgg16", None, SIZE, precision="float32", runtime=runtime)
    engine = FeatureEngine(config, resolved)
    chunk = engine.runner.chunk_size  # Keras' compiled graph takes exactly this many images, no other batch
    copies = np.arange(chunk + 3) % len(radiographs)  # the 4 images over and over: more than one chunk, the last padded
    every = engine.forward(radiographs[copies])
    assert every.shape == (chunk + 3, 512)
    np.testing.assert_array_equal(every, every[:4][copies])
    np.testing.assert_array_equal(engine.forward(radiographs[3:]), every[3:4])


def test_keras_chunks_are_wider_on_a_gpu_only():
    assert keras_chunk_size(GPU_BF16) == keras_chunk_size(GPU_OLD) > keras_chunk_size(CPU) == keras_chunk_size(CPU_BF16)


def test_strict_mode_stops_at_a_bad_first_file_before_building_the_model(seven_files, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    config, resolved = resolve_extractor("vgg16", None, SIZE, precision="float32", runtime="keras")
    engine = FeatureEngine(config, resolved)
    with pytest.raises(ImageError, match="bad.jpg"):
        list(engine.iter_features([str(bad), *seven_files], strict=True))
    assert not engine._runners


def test_the_throughput_benchmark_skips_the_pytorch_peer_and_says_why_where_torch_is_missing(subprocess_env, python):
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here: the peer would run (benchmark only, not in CI)")
    script = REPO / "benchmarks" / "extract_throughput.py"
    out = subprocess.run([python, str(script), "--peer-child", "resnet50", "--n", "4"], env=subprocess_env,
                         capture_output=True, text=True, check=True)
    skipped = json.loads(out.stdout.strip().splitlines()[-1])["skipped"]
    assert "cannot import torch" in skipped and "--peer-python" in skipped
