"""Progress bars: plain lines off a terminal (no carriage-return frames), time left while tuning."""

from __future__ import annotations

import io
import re
import subprocess
import time

import optuna
import pytest

from fracfeat._progress import LINE_INTERVAL_S, TrialProgress, progress_bar


def test_off_a_terminal_a_bar_writes_a_first_and_a_final_line():
    out = io.StringIO()  # not a terminal, like a log file or a pipe
    with progress_bar(total=1000, desc="extract vgg16", unit="img", file=out) as bar:
        for _ in range(1000):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2, text  # far within LINE_INTERVAL_S: the start and the end only
    assert lines[0].startswith("extract vgg16:   0% 0/1000")
    assert lines[1].startswith("extract vgg16: 100% 1000/1000")


def test_a_bar_that_vanishes_on_a_terminal_still_ends_its_log_with_a_final_line():
    out = io.StringIO()
    assert list(progress_bar(range(5), total=5, desc="hashing", unit="img", leave=False, file=out)) == list(range(5))
    assert out.getvalue().splitlines()[-1].startswith("hashing: 100% 5/5")


def test_a_disabled_bar_writes_nothing():
    out = io.StringIO()
    with progress_bar(total=3, desc="x", enabled=False, file=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""


@pytest.mark.slow
def test_cli_progress_to_a_file_is_a_few_plain_lines(python, subprocess_env, class_folder, tmp_path):
    # --batch-size 1: twelve updates of the extraction bar, which a terminal would redraw twelve times
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as log_file:
        r = subprocess.run([python, "-m", "fracfeat", "extract", str(class_folder), "--store", str(tmp_path / "store"),
                            "--weights", "none", "--image-size", "32", "--batch-size", "1"],
                           env=subprocess_env, stdout=subprocess.PIPE, stderr=log_file, text=True, timeout=300)
    assert r.returncode == 0, log_path.read_text()
    text = log_path.read_text()
    assert "\r" not in text
    for bar in ("hashing:", "extract vgg16:"):
        lines = [line for line in text.splitlines() if line.startswith(bar)]
        # a start line, a final one, and at most one per LINE_INTERVAL_S between them (a loaded machine took
        # 35 s over the first batch, building the model), never a line per update
        minutes, seconds = re.search(r"\[(\d+):(\d+)<", lines[-1]).groups()
        assert 2 <= len(lines) <= 2 + (60 * int(minutes) + int(seconds)) // LINE_INTERVAL_S, text
        assert lines[0].startswith(f"{bar}   0% 0/12") and lines[-1].startswith(f"{bar} 100% 12/12"), text


def _slow_objective(trial):
    time.sleep(0.05)
    return trial.suggest_float("x", 0.0, 1.0)


def _study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))


def test_time_left_is_the_timeout_when_that_comes_first(capsys):
    progress = TrialProgress(1000, scoring="roc_auc", timeout=30)
    started = time.monotonic()
    _study().optimize(_slow_objective, n_trials=3, callbacks=[progress])
    left, elapsed = progress.time_left(), time.monotonic() - started
    progress.close()
    # 997 trials x ~0.05 s would take ~50 s; the timeout ends the study sooner
    assert 30 - elapsed - 1 <= left <= 30 - elapsed + 1
    final = capsys.readouterr().err.splitlines()[-1]  # pytest's capture is not a terminal: plain lines
    assert final.startswith("tuning:   0% 3/1000") and "best roc_auc=" in final and "left=00:2" in final


def test_time_left_is_trials_left_times_the_mean_trial_time():
    progress = TrialProgress(6, timeout=3600, enabled=False)
    started = time.monotonic()
    _study().optimize(_slow_objective, n_trials=2, callbacks=[progress])
    left, elapsed = progress.time_left(), time.monotonic() - started
    assert left == pytest.approx(4 * elapsed / 2, rel=0.5)


def test_without_trials_or_timeout_there_is_no_estimate_and_the_old_call_still_works(capsys):
    progress = TrialProgress(None, scoring="f1")  # the signature callers used before timeout existed
    assert progress.time_left() is None
    _study().optimize(_slow_objective, n_trials=2, callbacks=[progress])
    assert progress.time_left() is None
    progress.close()
    final = capsys.readouterr().err.splitlines()[-1]
    assert final.startswith("tuning: 2 trials") and "left" not in final
