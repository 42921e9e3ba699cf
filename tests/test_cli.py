"""The `fracfeat` command line, end to end in real subprocesses (tiny sizes)."""

from __future__ import annotations

import json
import subprocess

import h5py
import numpy as np
import pytest

from fracfeat.cli import build_parser, main, split_store_ref
from test_bad_params import inf_store, inf_weights  # noqa: F401  (fixtures)

TINY_ARGS = ["--weights", "none", "--image-size", "32"]


def fracfeat(python, env, *args, cwd=None, timeout=300):
    return subprocess.run([python, "-m", "fracfeat", *map(str, args)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_user_error(result, *words):
    """Exit 1, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fracfeat: error: ")
    for w in words:
        assert w in lines[0], lines[0]


def _subcommand_paths(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _subcommand_paths(sub, prefix + (name,))


def test_every_command_has_help(capsys):
    paths = list(_subcommand_paths(build_parser()))
    assert {("extract",), ("store",), ("store", "list"), ("store", "verify")} <= set(paths)
    for path in [()] + paths:
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: fracfeat"), path


def test_help_in_a_subprocess(python, subprocess_env):
    r = fracfeat(python, subprocess_env, "--help")
    assert r.returncode == 0
    for command in ("extract", "store"):
        assert command in r.stdout


@pytest.mark.parametrize("text, expected", [
    ("store", ("store", "latest")), ("store@3", ("store", "3")), ("store@v12", ("store", "v12")),
    ("a@b/store", ("a@b/store", "latest")), ("dir@latest", ("dir", "latest")), ("store@1+2", ("store", "1+2")),
    ("store@v1+v3", ("store", "v1+v3")), ("a@1+b", ("a@1+b", "latest")),
])
def test_store_reference(text, expected):
    assert split_store_ref(text) == expected


@pytest.mark.slow
def test_extract_then_store_commands(python, subprocess_env, class_folder, tmp_path):
    store = tmp_path / "store"
    r = fracfeat(python, subprocess_env, "extract", class_folder, "--store", store, *TINY_ARGS)
    assert r.returncode == 0, r.stderr
    assert "v1" in r.stdout and "12 images" in r.stdout and "12 computed" in r.stdout
    # progress: the tqdm bar shows the rate in images per second, and info goes through logging
    assert "img/s" in r.stderr and "12 to compute" in r.stderr

    # a second run finds every image in the cache; --quiet silences progress and info
    r = fracfeat(python, subprocess_env, "extract", class_folder, "--store", store, *TINY_ARGS, "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "v1" in r.stdout and "unchanged" in r.stdout

    # a changed folder makes a second version; diff names the change
    (class_folder / "fractured" / sorted((class_folder / "fractured").iterdir())[0].name).unlink()
    r = fracfeat(python, subprocess_env, "extract", class_folder, "--store", store, *TINY_ARGS, "-q")
    assert "v2" in r.stdout and "11 images" in r.stdout

    r = fracfeat(python, subprocess_env, "store", "list", store)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("v1") and lines[1].startswith("v2")
    assert "vgg16 32px avg" in lines[0]

    r = fracfeat(python, subprocess_env, "store", "list", store, "--json")
    listed = json.loads(r.stdout)
    assert [v["version"] for v in listed] == [1, 2] and listed[0]["n_images"] == 12

    r = fracfeat(python, subprocess_env, "store", "show", store, "1")
    assert r.returncode == 0 and r.stdout.startswith("v1")
    assert "fingerprint" in r.stdout and "weights_kind" in r.stdout

    r = fracfeat(python, subprocess_env, "store", "show", store, "--json")
    shown = json.loads(r.stdout)
    assert shown["info"]["version"] == 2 and shown["provenance"]["image_size"] == 32

    r = fracfeat(python, subprocess_env, "store", "diff", store, "1", "2")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == "v1 -> v2: 0 added, 1 removed, 0 relabeled, 0 moved"
    assert r.stdout.splitlines()[1].startswith("- ")

    r = fracfeat(python, subprocess_env, "store", "verify", store)
    assert r.returncode == 0 and r.stdout.count(" ok ") == 2

    # damage v1's labels (keeping the file readable): verify names it and exits non-zero
    v1 = next((store / "versions").glob("v000001.h5"))
    with h5py.File(v1, "r+") as f:
        labels = f["labels"][:]
        f["labels"][:] = 1 - labels
    r = fracfeat(python, subprocess_env, "store", "verify", store)
    assert r.returncode == 1
    assert "v1  DAMAGED" in r.stdout and "labels" in r.stdout
    assert "v2  ok" in r.stdout
    assert_user_error(r, "v1", "damaged")


def test_user_errors_are_one_line(python, subprocess_env, tmp_path, class_folder):
    assert_user_error(fracfeat(python, subprocess_env, "extract", tmp_path / "missing", "--store", tmp_path / "s",
                               *TINY_ARGS), "does not exist")
    assert_user_error(fracfeat(python, subprocess_env, "extract", class_folder, "--backbone", "alexnet",
                               "--store", tmp_path / "s", *TINY_ARGS), "unknown backbone", "vgg16")
    assert_user_error(fracfeat(python, subprocess_env, "extract", class_folder, "--store", tmp_path / "s",
                               "--weights", tmp_path / "nope.h5"), "weights file", "nope.h5")
    assert_user_error(fracfeat(python, subprocess_env, "store", "list", tmp_path / "nostore"), "no feature store")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x.txt").write_text("x")
    assert_user_error(fracfeat(python, subprocess_env, "store", "verify", tmp_path / "notastore"),
                      "not a fracfeat feature store")


def test_bad_usage_exits_2_with_usage(python, subprocess_env):
    r = fracfeat(python, subprocess_env, "extract")
    assert r.returncode == 2 and "usage: fracfeat extract" in r.stderr
    r = fracfeat(python, subprocess_env, "extract", ".", "--image-size", "big")
    assert r.returncode == 2 and "invalid int value" in r.stderr


def test_import_of_cli_stays_light(python, subprocess_env):
    code = ("import sys, fracfeat.cli, fracfeat._report, fracfeat._progress; "
            "heavy = [m for m in ('tensorflow', 'keras', 'matplotlib', 'optuna', 'xgboost') if m in sys.modules]; "
            "print(heavy)")
    r = subprocess.run([python, "-c", code], env=subprocess_env, capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr


TUNE_ARGS = ["--classifier", "logreg", "--trials", "3", "--cv", "2"]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory, real_images):
    """`fracfeat run` once on 6 + 6 real radiographs (tiny settings); later tests reuse its output."""
    import os
    import shutil
    import sys

    from conftest import REPO

    root = tmp_path_factory.mktemp("job")
    data = root / "dataset"
    for label, paths in real_images.items():
        (data / label).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, data / label / p.name)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    out = root / "out"
    r = fracfeat(sys.executable, env, "run", data, "--out", out, *TINY_ARGS, *TUNE_ARGS, "--quiet")
    return {"result": r, "data": data, "out": out, "env": env, "python": sys.executable}


@pytest.mark.slow
def test_run_makes_model_and_report(main_job):
    r, out = main_job["result"], main_job["out"]
    assert r.returncode == 0, r.stderr
    assert "held out: a " in r.stdout and "held-out" in r.stdout and "roc_auc" in r.stdout
    assert (out / "model.joblib").is_file() and (out / "store" / "fracfeat-store.json").is_file()
    page = (out / "report" / "index.html").read_text()
    for png in ("confusion_matrix", "roc", "precision_recall", "score_distribution", "optimization_history",
                "param_importances", "samples"):
        assert f"{png}.png" in page and (out / "report" / f"{png}.png").stat().st_size > 1000
    # a folder of class folders has no groups: the page and the log say the hold-out is not grouped
    assert "no groups" in page and "no groups" in r.stderr
    assert "Traceback" not in r.stderr
    metrics = json.loads((out / "report" / "metrics.json").read_text())["metrics"]
    assert list(metrics) == ["held-out"] and metrics["held-out"]["n"] >= 2


@pytest.mark.slow
def test_fit_evaluate_predict(main_job, tmp_path):
    python, env, out, data = main_job["python"], main_job["env"], main_job["out"], main_job["data"]
    assert main_job["result"].returncode == 0
    model = tmp_path / "models" / "m.joblib"
    r = fracfeat(python, env, "fit", f"{out / 'store'}@1", "--out", model, *TUNE_ARGS)
    assert r.returncode == 0, r.stderr
    assert "CV roc_auc" in r.stdout and f"model: {model}" in r.stdout and model.is_file()
    assert "3/3" in r.stderr  # tuning progress: trial n of N

    r = fracfeat(python, env, "evaluate", model, out / "store", "--report", tmp_path / "report", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["all"]["n"] == 12 and 0.0 <= metrics["all"]["roc_auc"] <= 1.0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "samples.png" in page and "optimization_history.png" not in page  # no study given

    # the same model on the images themselves (the Pipeline extracts them) gives the same metrics
    r = fracfeat(python, env, "evaluate", model, data, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split() == ["metric", "all"]
    roc_line = next(line for line in r.stdout.splitlines() if line.startswith("roc_auc"))
    assert float(roc_line.split()[1]) == pytest.approx(metrics["all"]["roc_auc"], abs=1e-3)

    images = sorted((data / "fractured").iterdir())[:2]
    r = fracfeat(python, env, "predict", model, *images, "--format", "json", "-q")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["path"] for row in rows] == [str(p) for p in images]
    assert all(0.0 <= row["probability"] <= 1.0 and row["label"] in ("fractured", "not_fractured") for row in rows)
    r = fracfeat(python, env, "predict", model, *images, "-q")
    lines = r.stdout.splitlines()
    assert lines[0] == "path,probability,label,outside_training" and len(lines) == 3


@pytest.mark.slow
def test_fit_and_evaluate_user_errors(main_job, tmp_path, class_folder):
    from fracfeat import extract

    python, env, out = main_job["python"], main_job["env"], main_job["out"]
    tiny = dict(backbone="vgg16", weights=None, image_size=32, progress=False)
    paths = sorted(str(p) for p in class_folder.rglob("*.jpg"))
    extract(paths, store=tmp_path / "unlabeled", **tiny)
    assert_user_error(fracfeat(python, env, "fit", tmp_path / "unlabeled", "--out", tmp_path / "m.joblib",
                               *TUNE_ARGS), "labeled")
    assert not (tmp_path / "m.joblib").exists()
    # a store made with other extractor settings than the model's
    extract(class_folder, store=tmp_path / "maxpool", pooling="max", **tiny)
    assert_user_error(fracfeat(python, env, "evaluate", out / "model.joblib", tmp_path / "maxpool"),
                      "another extractor")
    assert_user_error(fracfeat(python, env, "predict", tmp_path / "missing.joblib", paths[0]),
                      "missing.joblib", "not found")
    (tmp_path / "junk.joblib").write_text("not a model")
    assert_user_error(fracfeat(python, env, "evaluate", tmp_path / "junk.joblib", out / "store"), "junk.joblib")
    assert_user_error(fracfeat(python, env, "fit", tmp_path / "nostore", "--out", tmp_path / "m.joblib"),
                      "no feature store")
    assert_user_error(fracfeat(python, env, "run", tmp_path / "nofolder", "--out", tmp_path / "o", *TINY_ARGS),
                      "does not exist")


# -- presets -------------------------------------------------------------------------------------------

PRESET = "fracatlas-vgg16-svm"


def test_options_not_given_leave_the_presets_settings_alone():
    from fracfeat.cli import _extract_kwargs, _tuning_kwargs

    parser = build_parser()
    args = parser.parse_args(["run", "src", "--out", "o", "--preset", PRESET])
    assert _extract_kwargs(args) == _tuning_kwargs(args) == {"preset": PRESET, "progress": True}
    args = parser.parse_args(["run", "src", "--out", "o", "--preset", PRESET, "--image-size", "32", "--trials", "2",
                              "--threshold", "none"])
    assert _extract_kwargs(args)["image_size"] == 32
    tuning = _tuning_kwargs(args)
    assert tuning["n_trials"] == 2 and tuning["threshold"] is None and "classifier" not in tuning


def test_presets_command_lists_the_table(capsys):
    from fracfeat._presets import PRESETS

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    names = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert names == list(PRESETS) and PRESET in names
    assert "backbone=vgg16" in out and "classifier=svm" in out and "measured: benchmarks/results/" in out
    assert main(["presets", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert list(listed) == list(PRESETS) and listed[PRESET]["fit"]["n_trials"] > 0


def test_preset_user_errors_are_one_line(python, subprocess_env, class_folder, tmp_path, tiny_features, capsys):
    assert_user_error(fracfeat(python, subprocess_env, "run", class_folder, "--out", tmp_path / "o",
                               "--preset", "nope", *TINY_ARGS), "unknown preset 'nope'", PRESET)
    # fit with a preset refuses a store made with other extractor settings, saying how to make matching ones
    assert main(["fit", tiny_features.store, "--out", str(tmp_path / "m.joblib"), "--preset", PRESET, "-q"]) == 1
    err = capsys.readouterr().err
    assert "image_size=32 (the preset's: 224)" in err and f"--preset {PRESET}" in err
    assert not (tmp_path / "m.joblib").exists()


def test_run_with_a_preset_end_to_end(python, subprocess_env, class_folder, tmp_path):
    out = tmp_path / "out"
    r = fracfeat(python, subprocess_env, "run", class_folder, "--out", out, "--preset", PRESET, *TINY_ARGS,
                 "--trials", "2", "--cv", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "roc_auc" in r.stdout and (out / "model.joblib").is_file()
    summary = json.loads((out / "report" / "metrics.json").read_text())["summary"]
    assert summary["preset"] == f"{PRESET}, except image_size=32 n_trials=2 cv=2"
    assert summary["classifier"] == "SVC" and summary["backbone"].startswith("vgg16, 32 px, avg pooling")


def test_extract_a_view_and_fit_with_augment(python, subprocess_env, class_folder, tmp_path):
    store, model = tmp_path / "store", tmp_path / "m.joblib"
    assert fracfeat(python, subprocess_env, "extract", class_folder, "--store", store, *TINY_ARGS, "-q").returncode == 0
    r = fracfeat(python, subprocess_env, "extract", class_folder, "--store", store, *TINY_ARGS, "-q", "--view", "hflip")
    assert r.returncode == 0, r.stderr
    assert "v2  view hflip  12 images" in r.stdout
    listed = fracfeat(python, subprocess_env, "store", "list", store).stdout.splitlines()
    assert "view=hflip" in listed[1] and "view=" not in listed[0]
    r = fracfeat(python, subprocess_env, "fit", f"{store}@1", "--augment", "v2", "--out", model, "--trials", "2",
                 "--cv", "3", "-q")
    assert r.returncode == 0, r.stderr
    assert "24 images with views hflip" in r.stdout
    # Mistakes are one-line errors: a bad view name, or the images themselves given as their view.
    assert_user_error(fracfeat(python, subprocess_env, "extract", class_folder, "--store", store, *TINY_ARGS,
                               "--view", "vflip"), "vflip", "hflip")
    assert_user_error(fracfeat(python, subprocess_env, "fit", f"{store}@1", "--augment", "1", "--out", model,
                               "--trials", "1", "--cv", "3"), "not an augmented view")


def test_run_with_augment(python, subprocess_env, class_folder, tmp_path):
    r = fracfeat(python, subprocess_env, "run", class_folder, "--out", tmp_path / "out", *TINY_ARGS, "--augment",
                 "hflip", "--classifier", "logreg", "--trials", "2", "--cv", "2", "-q")
    assert r.returncode == 0, r.stderr
    assert "augmented views" in (tmp_path / "out" / "report" / "index.html").read_text()
    assert_user_error(fracfeat(python, subprocess_env, "run", class_folder, "--out", tmp_path / "o2", *TINY_ARGS,
                               "--augment", "flip"), "flip", "hflip")


# -- user errors: one line naming the problem and the fix, before any expensive work (issue 19, items 12-15) --

# A budget that would tune for hours: each error below must come before tuning (or extraction) starts.
ENDLESS = ["--classifier", "logreg", "--trials", "100000", "--cv", "2", "-q"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_features):
    """A model fitted (one trial) on the tiny real features, saved as a .joblib file."""
    from fracfeat import fit, save_model

    path = tmp_path_factory.mktemp("tiny-model") / "m.joblib"
    save_model(fit(tiny_features, classifier="logreg", n_trials=1, cv=2), path)
    return path


def temporary_files(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_output_locations_are_checked_before_any_work(python, subprocess_env, tiny_features, tiny_model,
                                                      class_folder, tmp_path):
    store = tiny_features.store
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    run = fracfeat
    assert_user_error(run(python, subprocess_env, "fit", store, "--out", tmp_path / "a_folder", *ENDLESS, timeout=120),
                      "a_folder", "is a folder", "--out")
    assert_user_error(run(python, subprocess_env, "fit", store, "--out", tmp_path / "a_file" / "m.joblib", *ENDLESS,
                          timeout=120), "a_file", "not a folder")
    assert_user_error(run(python, subprocess_env, "fit", store, "--out", "/sys/m.joblib", *ENDLESS, timeout=120),
                      "/sys", "cannot write")
    assert_user_error(run(python, subprocess_env, "run", class_folder, "--out", tmp_path / "a_file", *TINY_ARGS,
                          *ENDLESS, timeout=120), "a_file", "is a file", "--out")
    assert_user_error(run(python, subprocess_env, "evaluate", tiny_model, store, "--report", tmp_path / "a_file"),
                      "a_file", "is a file", "--report")
    image = next((class_folder / "fractured").iterdir())
    assert_user_error(run(python, subprocess_env, "explain", tiny_model, image, "--out", tmp_path / "a_file"),
                      "a_file", "is a file", "--out")
    assert temporary_files(tmp_path) == [] and (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize("option, words", [
    (["--scoring", "foo"], ["scoring='foo'", "roc_auc", "get_scorer_names"]),
    (["--seed", "-1"], ["seed=-1", "2**32"]),
    (["--storage", "bogus://x"], ["bogus://x", "sqlite:///"]),
])
def test_tuning_options_are_checked_before_any_work(python, subprocess_env, tiny_features, tmp_path, option, words):
    model = tmp_path / "m.joblib"
    assert_user_error(fracfeat(python, subprocess_env, "fit", tiny_features.store, "--out", model, *ENDLESS, *option,
                               timeout=120), *words)
    assert not model.exists()


def test_run_checks_its_tuning_options_before_extracting(python, subprocess_env, class_folder, tmp_path):
    out = tmp_path / "out"
    assert_user_error(fracfeat(python, subprocess_env, "run", class_folder, "--out", out, *TINY_ARGS, *ENDLESS,
                               "--seed", "-1", timeout=120), "seed=-1")
    assert not out.exists()  # nothing extracted


def test_evaluate_names_the_studies_a_storage_holds(python, subprocess_env, tiny_features, tiny_model, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(storage=storage, study_name="tuned", direction="maximize")
    assert_user_error(fracfeat(python, subprocess_env, "evaluate", tiny_model, tiny_features.store, "--report",
                               tmp_path / "r", "--storage", storage, "--study-name", "nope"),
                      "no study 'nope'", "tuned", "--study-name")
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    assert_user_error(fracfeat(python, subprocess_env, "evaluate", tiny_model, tiny_features.store, "--report",
                               tmp_path / "r", "--storage", missing, "--study-name", "tuned"), "missing.db")
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "r").exists()


def test_image_size_has_an_upper_bound(python, subprocess_env, class_folder, tmp_path):
    assert_user_error(fracfeat(python, subprocess_env, "extract", class_folder, "--store", tmp_path / "s",
                               "--weights", "none", "--image-size", "100000"), "image_size=100000", "2048")
    assert not (tmp_path / "s").exists()


def test_manifest_encoding_and_nul_bytes_are_one_line(python, subprocess_env, real_images, tmp_path):
    image = real_images["fractured"][0]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"path,label\n{image},fractured\nRöntgen.jpg,fractured\n".encode("latin-1"))
    assert_user_error(fracfeat(python, subprocess_env, "extract", latin, "--store", tmp_path / "s", *TINY_ARGS),
                      "latin.csv, line 3", "UTF-8", "0xf6")
    nul = tmp_path / "nul.csv"
    nul.write_text(f"path,label\n{image}\0x,fractured\n")
    assert_user_error(fracfeat(python, subprocess_env, "extract", nul, "--store", tmp_path / "s", *TINY_ARGS),
                      "nul.csv, line 2", "NUL")


def test_predict_names_what_the_cli_can_do(python, subprocess_env, tiny_model, real_images, tmp_path):
    good = real_images["fractured"][0]
    r = fracfeat(python, subprocess_env, "predict", tiny_model, good, tmp_path / "gone.jpg", "-q")
    assert_user_error(r, "1 of 2 images", "gone.jpg: file not found", "IMAGE")
    assert "strict" not in r.stderr


def test_non_finite_features_are_one_line(python, subprocess_env, inf_store, tmp_path):
    assert_user_error(fracfeat(python, subprocess_env, "fit", inf_store.store, "--out", tmp_path / "m.joblib",
                               *ENDLESS, timeout=120), "NaN or inf", "fracfeat store verify")
    assert not (tmp_path / "m.joblib").exists()
