"""Progress display for long work: :func:`progress_bar` for every bar, and an Optuna callback
(trial n of N, best score so far, time left).

Extraction shows its bars (images/s and time left) from ``extract(progress=True)``.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import datetime

# Off a terminal (a log file, a pipe, CI) redrawn frames would pile up as carriage-return garbage:
# there a bar prints plain lines, at most one per this many seconds, plus its final state.
LINE_INTERVAL_S = 30.0

# The graphic part of a ``bar_format``; it shows on a terminal only.
GRAPHIC = "|{bar}|"


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", enabled: bool = True,
                 leave: bool = True, bar_format: str | None = None, file=None, **options):
    """A tqdm bar: redrawn in place on a terminal (or as a notebook widget), plain lines elsewhere.

    Off a terminal every display is one line without a carriage return: one at the start, then at
    most one every :data:`LINE_INTERVAL_S` seconds, and the final state at the end (also for
    ``leave=False``, so a log shows that the step finished). ``bar_format`` may hold the graphic as
    :data:`GRAPHIC`; lines leave it out. ``file`` defaults to ``sys.stderr``; ``options`` go to tqdm.
    """
    from tqdm.auto import tqdm

    stream = sys.stderr if file is None else file
    common = dict(total=total, desc=desc, unit=unit, disable=not enabled or stream is None, **options)
    if _redraws_in_place(tqdm, stream):
        return tqdm(iterable, file=stream, leave=leave, bar_format=bar_format, dynamic_ncols=True, **common)
    # ncols=0: tqdm's stats without the graphic (it ignores bar_format then, so not with one).
    plain = {"bar_format": bar_format.replace(GRAPHIC, "")} if bar_format else {"ncols": 0}
    return tqdm(iterable, file=_OneLinePerFrame(stream), leave=True, mininterval=LINE_INTERVAL_S, miniters=1,
                **plain, **common)


def _redraws_in_place(tqdm_class, stream) -> bool:
    notebook = sys.modules.get("tqdm.notebook")  # loaded by tqdm.auto only inside Jupyter
    if notebook is not None and issubclass(tqdm_class, notebook.tqdm):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _OneLinePerFrame:
    """tqdm's ``file`` off a terminal: each frame tqdm draws ("\\r" + text) becomes one line."""

    def __init__(self, stream):
        self.stream = stream
        self._last = None

    def write(self, text: str) -> None:
        for frame in text.replace("\n", "\r").split("\r"):
            frame = frame.rstrip()
            # Blank frames are tqdm erasing its line; a repeat is close() redrawing the last state.
            if frame.strip() and frame != self._last:
                self.stream.write(frame + "\n")
                self._last = frame

    def flush(self) -> None:
        self.stream.flush()


class TrialProgress:
    """Optuna callback showing ``trial n of N``, the best score so far and the time left on a bar.

    Pass it in ``callbacks=`` of :meth:`optuna.study.Study.optimize` (or of :func:`fracfeat.fit`).
    It counts the trials it sees, so a study resumed from storage shows this run's trials only.

    Parameters
    ----------
    n_trials : int or None
        Trials this run will make (the bar's total); None when only a timeout bounds the study.
    scoring : str
        Name shown next to the best value.
    enabled : bool
        False shows nothing (``--quiet``).
    desc : str
        Label at the start of the bar.
    timeout : float or None
        The study's timeout in seconds, for the time left (see :meth:`time_left`).

    Examples
    --------
    >>> import optuna
    >>> progress = TrialProgress(20, scoring="roc_auc", timeout=600)
    >>> study.optimize(objective, n_trials=20, timeout=600, callbacks=[progress])  # doctest: +SKIP
    >>> progress.close()                                                              # doctest: +SKIP
    """

    def __init__(self, n_trials: int | None, *, scoring: str = "score", enabled: bool = True, desc: str = "tuning",
                 timeout: float | None = None):
        self.n_trials = n_trials
        self.scoring = scoring
        self.enabled = enabled
        self.desc = desc
        self.timeout = timeout
        self.n_seen = 0
        self.n_pruned = 0
        self._bar = None
        self._started = None  # time.monotonic() when the first trial this run saw began

    def _ensure_bar(self):
        if self._bar is None:
            counts = "{percentage:3.0f}%" + GRAPHIC + " {n_fmt}/{total_fmt}" if self.n_trials else "{n_fmt} trials"
            # Our own time left replaces tqdm's, which knows nothing of the timeout; smoothing=0: the
            # rate is the mean over the run, as the time left is.
            self._bar = progress_bar(total=self.n_trials, desc=self.desc, unit="trial", enabled=self.enabled,
                                     bar_format="{desc}: " + counts + " [{elapsed}, {rate_fmt}{postfix}]",
                                     smoothing=0)
            if not self._bar.disable:  # the bar appears with the first finished trial; its clock starts with the run
                self._bar.start_t -= time.monotonic() - self._started
        return self._bar

    def time_left(self) -> float | None:
        """Seconds until the study ends, estimated: the smaller of (trials left x mean time per trial
        so far) and what remains of ``timeout``; None before the first trial or when neither bounds it."""
        if not self.n_seen or self._started is None:
            return None
        elapsed = time.monotonic() - self._started
        bounds = []
        if self.n_trials:
            bounds.append(max(0, self.n_trials - self.n_seen) * elapsed / self.n_seen)
        if self.timeout is not None:
            bounds.append(max(0.0, self.timeout - elapsed))
        return min(bounds) if bounds else None

    def __call__(self, study, trial) -> None:
        import optuna
        from tqdm import tqdm

        if self._started is None:
            # Optuna's timeout counts from optimize(), which is when the first trial started.
            began = trial.datetime_start
            self._started = time.monotonic() - ((datetime.now() - began).total_seconds() if began else 0.0)
        bar = self._ensure_bar()
        self.n_seen += 1
        if trial.state == optuna.trial.TrialState.PRUNED:
            self.n_pruned += 1
        postfix = {}
        best = best_value(study)
        if best is not None:
            postfix[f"best {self.scoring}"] = f"{best:.4f}"
        if self.n_pruned:
            postfix["pruned"] = self.n_pruned
        left = self.time_left()
        if left is not None:
            postfix["left"] = tqdm.format_interval(left)
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def best_value(study) -> float | None:
    """The study's best value, or None while no trial has completed (Optuna raises then)."""
    try:
        value = study.best_value
    except ValueError:
        return None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
