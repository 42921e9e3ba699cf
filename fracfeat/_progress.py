"""Progress display for long work: a tqdm bar for Optuna studies (trial n of N, best score so far).

Extraction already shows a tqdm bar (images/s and time left) from ``extract(progress=True)``.
"""

from __future__ import annotations

import math


class TrialProgress:
    """Optuna callback showing ``trial n of N`` and the best score so far on a tqdm bar.

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

    Examples
    --------
    >>> import optuna
    >>> progress = TrialProgress(20, scoring="roc_auc")
    >>> study.optimize(objective, n_trials=20, callbacks=[progress])  # doctest: +SKIP
    >>> progress.close()                                               # doctest: +SKIP
    """

    def __init__(self, n_trials: int | None, *, scoring: str = "score", enabled: bool = True, desc: str = "tuning"):
        self.n_trials = n_trials
        self.scoring = scoring
        self.enabled = enabled
        self.desc = desc
        self.n_seen = 0
        self.n_pruned = 0
        self._bar = None

    def _ensure_bar(self):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.n_trials, desc=self.desc, unit="trial", disable=not self.enabled,
                             dynamic_ncols=True)
        return self._bar

    def __call__(self, study, trial) -> None:
        import optuna

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
