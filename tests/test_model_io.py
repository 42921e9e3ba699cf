"""save_model / load_model: a model file is written atomically and reads back as it was saved.

Real files throughout; the crash test SIGKILLs a real child process while it is saving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from fracfeat import FitResult, load_model, save_model

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 5))
Y = (X[:, 0] + 0.3 * RNG.normal(size=40) > 0).astype(int)


def small_pipeline(C: float = 1.0) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=C))]).fit(X, Y)


def folder_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class FailsWhenPickled:
    """A pipeline step whose pickling raises, after the steps before it were written."""

    def __init__(self, error: BaseException):
        self.error = error

    def __reduce__(self):
        raise self.error


def test_save_model_makes_the_folder_returns_the_path_and_loads_back(tmp_path):
    pipeline = small_pipeline()
    path = tmp_path / "models" / "new" / "m.joblib"
    assert save_model(pipeline, path) == str(path)
    assert folder_entries(path.parent) == ["m.joblib"]  # no temporary file left
    np.testing.assert_array_equal(load_model(path).predict_proba(X), pipeline.predict_proba(X))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as joblib.dump or open() would make it


def test_save_model_of_a_fit_result_saves_its_pipeline(tmp_path):
    pipeline = small_pipeline()
    result = FitResult(pipeline=pipeline, study=None, best_params={}, cv_score=0.5, classifier="logreg",
                       scoring="roc_auc", scores={}, threshold=None, n_train=len(X), cv_folds=3, grouped=False,
                       trials={})
    path = save_model(result, tmp_path / "m.joblib")
    assert type(joblib.load(path)) is Pipeline  # the Pipeline, not the FitResult (and its study)
    path = result.save(tmp_path / "other" / "m.joblib")
    assert path == str(tmp_path / "other" / "m.joblib")
    np.testing.assert_array_equal(load_model(path).predict(X), pipeline.predict(X))


def test_save_model_replaces_a_model_already_there(tmp_path):
    path = tmp_path / "m.joblib"
    save_model(small_pipeline(C=1.0), path)
    save_model(small_pipeline(C=0.01), path)
    assert load_model(path)[-1].C == 0.01
    assert folder_entries(tmp_path) == ["m.joblib"]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=lambda e: type(e).__name__)
def test_a_save_that_fails_midway_keeps_the_previous_model_and_leaves_no_temporary_file(tmp_path, error):
    path = tmp_path / "m.joblib"
    save_model(small_pipeline(), path)
    before = path.read_bytes()
    padding = FunctionTransformer(kw_args={"pad": np.ones(500_000)})  # 4 MB written before the failure
    broken = Pipeline([("pad", padding), ("fails", FailsWhenPickled(error)), ("clf", LogisticRegression())])
    with pytest.raises(type(error)):
        save_model(broken, path)
    assert path.read_bytes() == before
    assert folder_entries(tmp_path) == ["m.joblib"]
    load_model(path)


def test_concurrent_saves_to_one_path_leave_one_whole_model(tmp_path):
    path = tmp_path / "m.joblib"
    models = [small_pipeline(C=c) for c in (0.1, 1.0, 10.0, 100.0)]
    threads = [threading.Thread(target=save_model, args=(m, path)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load_model(path)[-1].C in (0.1, 1.0, 10.0, 100.0)
    assert folder_entries(tmp_path) == ["m.joblib"]


# A child that saves a model over PATH and is held (then SIGKILLed) at POINT: "writing" while the
# temporary file is half written, "renaming" once it is complete but not yet renamed over PATH.
CHILD = r"""
import os, sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
import fracfeat._model_io
from fracfeat import save_model

path, point, held = sys.argv[1:4]

def hold():
    open(held, "w").close()
    while True:
        time.sleep(1)

class HoldWhenPickled:
    def __reduce__(self):
        hold()

steps = [("pad", FunctionTransformer(kw_args={"pad": np.ones(500_000)})), ("clf", LogisticRegression())]
if point == "writing":
    steps.insert(1, ("hold", HoldWhenPickled()))
else:
    fracfeat._model_io.os.replace = lambda *args: hold()
save_model(Pipeline(steps), path)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["writing", "renaming"])
def test_a_save_killed_in_a_real_process_keeps_the_previous_model(tmp_path, point, python, subprocess_env):
    path, held = tmp_path / "models" / "m.joblib", tmp_path / "held"
    pipeline = small_pipeline()
    save_model(pipeline, path)
    before = path.read_bytes()
    child = subprocess.Popen([python, "-c", CHILD, str(path), point, str(held)], env=subprocess_env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert child.poll() is None, f"the child exited ({child.returncode}):\n{child.stderr.read()}"
            assert time.monotonic() < deadline, "the child did not reach its hold point in 120 s"
            time.sleep(0.05)
        temporary = [p for p in path.parent.iterdir() if p != path]
        assert len(temporary) == 1 and temporary[0].name.startswith(".m.joblib.")
        assert temporary[0].stat().st_size > 1_000_000  # the kill lands with the new model (partly) on disk
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before  # never a half-written (or any new) model under the final name
    np.testing.assert_array_equal(load_model(path).predict_proba(X), pipeline.predict_proba(X))
    # What a killed save leaves is its hidden temporary file, never a file named like a model.
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".joblib"] == ["m.joblib"]


def test_fit_result_save_writes_a_model_that_predicts_from_image_paths(tiny_features, tmp_path):
    from fracfeat import fit

    result = fit(tiny_features, classifier="logreg", n_trials=1, cv=3, progress=False)
    path = result.save(tmp_path / "models" / "m.joblib")
    assert folder_entries(Path(path).parent) == ["m.joblib"]
    paths = [str(p) for p in tiny_features.paths[:4]]
    np.testing.assert_allclose(load_model(path).predict_proba(paths), result.pipeline.predict_proba(paths))


def test_load_model_is_still_importable_from_its_former_module():
    import fracfeat._metrics

    assert fracfeat._metrics.load_model is load_model
    assert sys.modules["fracfeat"].save_model is save_model
