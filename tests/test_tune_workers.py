"""Tuning across processes on a real PostgreSQL server: workers join fit's stored study, no trial twice.

The server comes from the environment: ``FRACFEAT_TEST_POSTGRES=postgresql://user:pw@host:port/db``
(.ci/run installs Debian's postgresql, starts it and sets it). Without it these tests skip and say so,
unless ``FRACFEAT_REQUIRE_SERVERS=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import numpy as np
import pytest

from fracfeat import ConfigError, fit
from fracfeat._fit import tune_worker


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get("FRACFEAT_TEST_POSTGRES")
    if not url:
        why = ("no PostgreSQL server: set FRACFEAT_TEST_POSTGRES=postgresql://user:password@host:port/database "
               "(.ci/run starts one)")
        if os.environ.get("FRACFEAT_REQUIRE_SERVERS") == "1":
            pytest.fail(f"FRACFEAT_REQUIRE_SERVERS=1 but {why}")
        pytest.skip(why)
    return url


def study_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def params_of(study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials if t.params]


def test_a_single_process_stored_study_finds_what_an_in_memory_one_finds(tiny_features, postgres_url):
    """One process, same seed and trials: the study on PostgreSQL is the in-memory one (Optuna is deterministic
    there); the stored study resumed with the same n_trials runs nothing more."""
    name = study_name()
    stored = fit(tiny_features, n_trials=5, cv=3, storage=postgres_url, study_name=name)
    memory = fit(tiny_features, n_trials=5, cv=3)
    assert stored.best_params == memory.best_params and stored.cv_score == pytest.approx(memory.cv_score, abs=1e-12)
    again = fit(tiny_features, n_trials=5, cv=3, storage=postgres_url, study_name=name)
    assert len(again.study.trials) == 5 and again.best_params == stored.best_params


def test_a_tune_worker_process_shares_the_trials_and_the_caller_builds_the_model(tiny_features, postgres_url,
                                                                                  subprocess_env, python, tmp_path):
    """A real `fracfeat tune-worker` process, started before the study exists, waits for it and joins: the study
    holds the trials asked for (one more at most, a worker's trial running when the count was reached), each
    trial's parameters its own (the worker's sampler is seeded apart), and fit's model is the best trial's."""
    name, n_trials = study_name(), 12
    ref = f"{tiny_features.store}@{tiny_features.version}"
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([python, "-m", "fracfeat", "tune-worker", ref, "--storage", postgres_url, "--study",
                                   name, "--trials", str(n_trials), "--wait", "120"],
                                  env={**subprocess_env, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE,
                                  stderr=log, text=True)
    try:
        deadline = time.monotonic() + 120
        while "not started yet" not in log_path.read_text():  # the worker is up and polls for the study
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        result = fit(tiny_features, n_trials=n_trials, cv=3, storage=postgres_url, study_name=name)
        out, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, log_path.read_text()
    ran_by_worker = int(out.split()[0])
    study = result.study
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert n_trials <= len(finished) <= n_trials + 1 and len(study.trials) == len(finished)
    assert 1 <= ran_by_worker < len(finished)
    assert len(set(params_of(study))) == len(study.trials)  # no trial proposed twice
    assert result.cv_score == max(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert result.best_params == study.best_trial.params
    proba = result.pipeline[1:].predict_proba(np.asarray(tiny_features.X[:4]))
    assert proba.shape == (4, 2)


def test_a_worker_refuses_a_study_of_other_data_and_one_never_started(tiny_features, postgres_url):
    name = study_name()
    fit(tiny_features, n_trials=2, cv=3, storage=postgres_url, study_name=name)
    with pytest.raises(ConfigError, match="was run on other data or settings"):
        tune_worker(tiny_features.subset(np.arange(40)), storage=postgres_url, study_name=name, n_trials=4)
    with pytest.raises(ConfigError, match=r"no fracfeat study 'never-started' in .* after 0s: start it with"):
        tune_worker(tiny_features, storage=postgres_url, study_name="never-started", n_trials=4, wait=0)


def test_auto_leaves_the_kernel_svm_out_on_many_rows_and_svm_says_so(tiny_features, monkeypatch, caplog):
    """Above SVM_MAX_ROWS training rows (lowered here to 30, under the 48 rows at hand) "auto" searches every family
    but the kernel SVM, and says why; classifier="svm" still runs, with a warning naming what scales."""
    import logging

    from fracfeat import _fit

    monkeypatch.setattr(_fit, "SVM_MAX_ROWS", 30)
    with caplog.at_level(logging.INFO, logger="fracfeat"):
        result = fit(tiny_features, classifier="auto", n_trials=5, cv=3)
        fit(tiny_features, classifier="svm", n_trials=1, cv=3)
    assert "svm" not in {t.params["classifier"] for t in result.study.trials}
    assert any("kernel SVM is left out above 30 rows" in r.getMessage() for r in caplog.records)
    assert any(r.levelname == "WARNING" and "tune logreg or xgboost instead" in r.getMessage() for r in caplog.records)
