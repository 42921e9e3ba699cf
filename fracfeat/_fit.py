"""fit(): an Optuna study over (grouped) cross-validation folds -> a fitted scikit-learn Pipeline.

fit knows feature sets, not images: the Pipeline's first step (:class:`DeepFeatures`) is rebuilt from
the store version's provenance, so the kept model predicts from image paths with the same extractor.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ._classifiers import FAMILIES, SearchContext, check_classifier, suggest_steps
from ._deps import require
from ._errors import ConfigError, bad_rows_fix, check_finite_rows
from ._featureset import FeatureSet, labeled_for_training
from ._metrics import ranking_alarm
from ._model_io import save_model
from ._presets import check_features, preset_defaults
from ._progress import TrialProgress
from ._store import FeatureStore
from ._validation import BY_VALUE, BY_VALUE_CHOICES, leave_one_value_out, per_value_lines, per_value_metrics, values_of

log = logging.getLogger("fracfeat")


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    pipeline : sklearn.pipeline.Pipeline
        Fitted: ``features`` (DeepFeatures, image paths in) -> ``scale`` -> ``reduce`` -> ``classifier``.
        ``pipeline[1:]`` takes feature arrays. Save it with :meth:`save` (or :func:`fracfeat.save_model`).
    study : optuna.Study
    best_params : dict
        The best trial's parameters (names prefixed by family, e.g. ``logreg_C``).
    cv_score : float
        Mean cross-validated ``scoring`` of the best trial, on the tuning rows.
    classifier : str
        Family of the best trial ("logreg", "svm", "xgboost").
    scoring : str
    scores : dict
        ``{"cv": cv_score, "val": ..., "test": ...}``: held-out splits are scored once, after tuning.
    threshold : float or None
        Decision threshold on P(fractured) kept inside the Pipeline, when one was asked for.
    n_train : int
        Rows the kept model was trained on (augmented views included).
    cv_folds : int
    grouped : bool
        True when folds kept each group on one side (StratifiedGroupKFold).
    trials : dict
        Counts of complete, pruned and failed trials in the study.
    store, version, fingerprint :
        The store version the model was trained on.
    seconds : float
        Wall time of this call.
    fold_scores : list of float
        The best trial's score on each fold.
    alarms : list of str
        Warnings in plain words, also logged: a CV or held-out ROC AUC far below 0.5 (the model ranks
        inversely: something is wrong with the data or the model).
    augment : tuple of str
        Augmented views added to the training rows (``augment=``), e.g. ``("hflip",)``.
    balance : str or None
        The ``balance=`` the model was trained with.
    cv_by_value : dict or None
        With ``cv="source"``, ``"region"`` or ``"projection"``: per held-out value, ``{"n", "n_fractured", "roc_auc",
        "sensitivity", "specificity", "resampled"}``, each metric ``{"value", "low", "high"}`` (95%
        group-bootstrap interval, :func:`fracfeat._validation.bootstrap_ci`), from the best trial's
        out-of-fold probabilities (the kept model's kind, refitted without the held-out value) at the
        kept threshold (0.5 on P(fractured) when none is kept).
    """

    pipeline: object
    study: object
    best_params: dict
    cv_score: float
    classifier: str
    scoring: str
    scores: dict
    threshold: float | None
    n_train: int
    cv_folds: int
    grouped: bool
    trials: dict
    store: str | None = None
    version: int | str | None = None
    fingerprint: str | None = None
    seconds: float = 0.0
    fold_scores: list = field(default_factory=list)
    augment: tuple = ()
    alarms: list = field(default_factory=list)
    balance: str | None = None
    cv_by_value: dict | None = None
    cv_by: str | None = None

    def __repr__(self) -> str:
        held = ", ".join(f"{k}={v:.4f}" for k, v in self.scores.items() if k != "cv" and v is not None)
        by = ""
        if self.cv_by_value:
            aucs = {v: m["roc_auc"] for v, m in self.cv_by_value.items()}
            by = (f", held out by {self.cv_by}: mean ROC AUC {np.mean([a['value'] for a in aucs.values()]):.3f} ("
                  + ", ".join(f"{v} {a['value']:.3f} [{a['low']:.2f}-{a['high']:.2f}]" for v, a in aucs.items()) + ")")
        weighted = f", balance={self.balance!r}" if self.balance else ""
        return (f"FitResult({self.classifier}, cv {self.scoring}={self.cv_score:.4f}"
                f"{', ' + held if held else ''}{by}{weighted}, trials={self.trials}, version={self.version})")

    def by_value_text(self) -> str:
        """The per-held-out-value table (``cv`` a row metadata field, e.g. "region") as text; "" for k folds."""
        if not self.cv_by_value:
            return ""
        return "\n".join(per_value_lines(self.cv_by_value, self.cv_by))

    def save(self, path) -> str:
        """Save the pipeline to ``path`` atomically (:func:`fracfeat.save_model`); returns the path."""
        return save_model(self.pipeline, path)


def as_feature_set(features, version="latest") -> FeatureSet:
    """A FeatureSet from a FeatureSet, a FeatureStore, or a store directory."""
    if isinstance(features, FeatureSet):
        return features
    if isinstance(features, FeatureStore):
        return features.open(version)
    if isinstance(features, (str, bytes)) or hasattr(features, "__fspath__"):
        return FeatureStore(features).open(version)
    raise ConfigError(f"features must be a FeatureSet (from extract), a FeatureStore or a store directory, "
                      f"not {type(features).__name__}")


def make_folds(fs: FeatureSet, cv, seed: int) -> tuple[list, bool]:
    """Cross-validation folds as index pairs, computed once so every trial sees the same ones.

    ``cv`` a row metadata field (``"source"``, ``"region"``, ``"projection"``): one fold per value, holding out all its rows
    (:func:`fracfeat._validation.leave_one_value_out` says what it refuses).
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    grouped = fs.has_groups
    groups = fs.groups if grouped else None
    check_cv(cv)
    if isinstance(cv, str):
        return leave_one_value_out(values_of(fs, cv), fs.y, groups, what=cv), grouped
    if isinstance(cv, (int, np.integer)):
        smallest = int(np.bincount(fs.y, minlength=2).min())
        if smallest < cv:
            raise ConfigError(f"cv={cv} folds need at least {cv} images of each class; the smaller class has "
                              f"{smallest}. Lower cv or add images.")
        if grouped and len(set(groups)) < cv:
            raise ConfigError(f"cv={cv} folds need at least {cv} groups; the feature set has {len(set(groups))}")
        splitter = (StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=seed) if grouped
                    else StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed))
    else:
        splitter = cv
    folds = [(np.asarray(tr), np.asarray(va)) for tr, va in splitter.split(fs.X, fs.y, groups)]
    for k, (_, va) in enumerate(folds):
        if len(np.unique(fs.y[va])) < 2:
            raise ConfigError(f"fold {k} holds one class only; lower cv so every fold sees both classes")
    return folds, grouped


def check_cv(cv) -> None:
    """A number of folds (>= 2), a row metadata field (BY_VALUE) or a scikit-learn splitter, else a ConfigError."""
    if isinstance(cv, (int, np.integer)) and not isinstance(cv, bool):
        if cv < 2:
            raise ConfigError(f"cv={cv}: give at least 2 folds")
    elif isinstance(cv, str):
        if cv not in BY_VALUE:
            raise ConfigError(f"cv={cv!r}: give a number of folds, one of {BY_VALUE_CHOICES} (one fold per "
                              f"held-out value), or a scikit-learn splitter")
    elif not hasattr(cv, "split"):
        raise ConfigError(f"cv={cv!r}: give a number of folds, one of {BY_VALUE_CHOICES}, or a scikit-learn splitter")


BALANCE = (None, "classes", *BY_VALUE)
# The classifiers' own class weighting, switched off when fit weighs the rows (balance=): the weights
# then balance the classes already, within each source or region. Parameter names of _classifiers.
UNWEIGHTED_CLASSES = {"logreg_class_weight": "none", "svm_class_weight": "none", "xgb_scale_pos_weight": "none"}


def check_balance(balance) -> None:
    if balance not in BALANCE:
        raise ConfigError(f"balance={balance!r}: give None, 'classes' or one of {BY_VALUE_CHOICES}")


def balance_weights(y, values) -> np.ndarray:
    """Row weights such that within each value the two classes weigh the same, and every value the same.

    The weights sum to the number of rows. A value holding one class only gives that class its whole
    share. ``values`` all equal: plain class balancing.
    """
    y, values = np.asarray(y), np.asarray(values).astype(str)
    weights = np.empty(len(y), dtype=np.float64)
    distinct = np.unique(values)
    for value in distinct:
        in_value = values == value
        classes = np.unique(y[in_value])
        for c in classes:
            rows = in_value & (y == c)
            weights[rows] = len(y) / (len(distinct) * len(classes) * rows.sum())
    return weights


def _balance_values(fs: FeatureSet, balance) -> np.ndarray | None:
    """What the weights balance over (None: no weights): one value for "classes", else each row's source, region or projection."""
    if balance is None:
        return None
    if balance == "classes":
        return np.zeros(len(fs), dtype=object)
    values = values_of(fs, balance)
    missing = int(sum(v == "" for v in values))
    if missing:
        raise ConfigError(f"balance={balance!r} needs a {balance} for every training row; {missing} of {len(fs)} "
                          f"have none. Give the manifest a {balance} column (or pass sources as {{name: source}})")
    return values


def check_tuning(classifier, n_trials, cv, scoring, threshold, *, seed=0, storage=None):
    """Check the tuning settings before any data is read; returns (classifier family, scorer)."""
    from sklearn.metrics import get_scorer

    classifier = check_classifier(classifier)
    if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 1:
        raise ConfigError(f"n_trials={n_trials!r}: give a positive integer")
    check_cv(cv)
    if threshold is not None:
        parse_threshold(threshold)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r}: give an integer from 0 to 2**32 - 1 (numpy's and Optuna's seed range)")
    check_storage(storage)
    try:
        return classifier, get_scorer(scoring)
    except ValueError:
        raise ConfigError(f"scoring={scoring!r} is not a scikit-learn scorer: give one such as roc_auc, "
                          f"average_precision, balanced_accuracy or neg_brier_score "
                          f"(sklearn.metrics.get_scorer_names() lists them all)") from None


def check_storage(storage) -> None:
    """An Optuna storage URL (SQLAlchemy's: ``sqlite:///study.db``, ``postgresql://...``) that names a database
    driver installed here and, for SQLite, a folder that exists; or a ConfigError saying so. Storage objects pass."""
    if not isinstance(storage, str):
        return
    hint = "give e.g. sqlite:///study.db (a file) or postgresql://user@host/db"
    try:
        from sqlalchemy.engine import make_url

        url = make_url(storage)
        url.get_dialect()  # loads the driver: no connection is made
    except Exception as e:  # sqlalchemy's ArgumentError, NoSuchModuleError, a driver's ImportError
        raise ConfigError(f"storage={storage!r} is not a storage URL Optuna can open ({type(e).__name__}: {e}); "
                          f"{hint}") from None
    folder = os.path.dirname(os.path.abspath(url.database)) if url.get_backend_name() == "sqlite" and url.database \
        else None
    if folder is not None and not os.path.isdir(folder):
        raise ConfigError(f"storage={storage!r}: the folder {folder} of its SQLite file does not exist; make it "
                          f"or {hint}")


def choose_threshold(y: np.ndarray, proba: np.ndarray, goal) -> float:
    """A threshold on P(fractured) from out-of-fold probabilities.

    ``"balanced_accuracy"`` maximizes balanced accuracy; ``("sensitivity", 0.9)`` (or ``{"sensitivity": 0.9}``,
    or ``"sensitivity:0.9"``) takes the highest threshold whose sensitivity reaches 0.9, which keeps
    specificity as high as the target allows.
    """
    name, target = parse_threshold(goal)
    candidates = np.unique(proba)
    pos, neg = y == 1, y == 0
    # Predict positive when proba >= t (FixedThresholdClassifier's rule).
    sens = np.array([(proba[pos] >= t).mean() for t in candidates])
    spec = np.array([(proba[neg] < t).mean() for t in candidates])
    if name == "balanced_accuracy":
        return float(candidates[int(np.argmax((sens + spec) / 2))])
    reaching = np.flatnonzero(sens >= target)
    return float(candidates[reaching.max()]) if len(reaching) else float(candidates.min())


def parse_threshold(goal) -> tuple[str, float | None]:
    if isinstance(goal, str) and ":" in goal:
        name, value = goal.split(":", 1)
        goal = (name, value)
    if isinstance(goal, dict) and len(goal) == 1:
        goal = next(iter(goal.items()))
    if goal == "balanced_accuracy":
        return "balanced_accuracy", None
    if isinstance(goal, tuple) and len(goal) == 2 and goal[0] == "sensitivity":
        try:
            target = float(goal[1])
        except ValueError:
            target = -1.0
        if 0.0 < target <= 1.0:
            return "sensitivity", target
    raise ConfigError(f"threshold={goal!r}: give None, 'balanced_accuracy', or a target sensitivity such as "
                      f"'sensitivity:0.9' or {{'sensitivity': 0.9}}")


@contextlib.contextmanager
def _quiet_convergence():
    """Silence the solvers' convergence warnings only: a deprecation raised by our calls must still surface."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


@contextlib.contextmanager
def quiet_optuna():
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _make_study(study, storage, study_name, sampler, pruner, seed, tag: dict):
    import optuna

    if study is not None:
        if storage is not None or study_name is not None:
            raise ConfigError("pass either study= or storage=/study_name=, not both")
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ConfigError("study= must maximize (fit maximizes the score)")
    else:
        if pruner is True:
            # Compare a trial's running mean after each fold with earlier trials' at the same fold.
            pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
        elif pruner in (False, None):
            pruner = optuna.pruners.NopPruner()
        study = optuna.create_study(
            storage=rdb_storage(storage), study_name=study_name, load_if_exists=True, direction="maximize",
            sampler=sampler if sampler is not None else optuna.samplers.TPESampler(seed=seed), pruner=pruner,
        )
    recorded = study.user_attrs.get("fracfeat")
    if recorded is None:
        study.set_user_attr("fracfeat", tag)
    elif recorded != tag:
        diff = {k: (recorded.get(k), tag.get(k)) for k in {**recorded, **tag} if recorded.get(k) != tag.get(k)}
        raise ConfigError(f"study {study.study_name!r} was run on other data or settings ({diff}, as "
                          f"(study, now)); resume it with the same ones, or give a new study_name")
    return study


@preset_defaults("fit")
def fit(
    features,
    *,
    preset=None,
    classifier: str = "logreg",
    n_trials: int = 50,
    timeout: float | None = None,
    cv=5,
    scoring="roc_auc",
    seed: int = 0,
    storage=None,
    study_name: str | None = None,
    n_jobs: int = 1,
    study=None,
    sampler=None,
    pruner=True,
    threshold=None,
    version="latest",
    weights=None,
    n_threads: int | None = None,
    callbacks=None,
    progress: bool = False,
    augment=(),
    balance=None,
) -> FitResult:
    """Tune a classifier on deep features with Optuna and return a fitted Pipeline that reads images.

    Parameters
    ----------
    features : FeatureSet, FeatureStore or store directory
        Labeled feature rows (from :func:`extract` or a store version). Unlabeled rows are ignored.
        When rows carry train/val/test splits, tuning and the kept model see the train rows only;
        val and test are scored once at the end.
    preset : str or Preset, optional
        A named preset (:func:`fracfeat.presets`): its tuning settings fill every one this call does not
        pass (keywords given win), and ``features`` must have been extracted with its extractor settings
        (ConfigError naming the setting that differs otherwise).
    classifier : {"logreg", "svm", "xgboost", "mlp", "auto"}
        "mlp" is a dense head (scikit-learn's MLPClassifier). "auto" searches every family in one study;
        above ``SVM_MAX_ROWS`` (20,000) training rows it leaves the kernel SVM out (its fit time grows about
        as rows^2; docs/scale.md), and "svm" warns there.
    n_trials : int
        Trials the study should hold when this call ends (complete + pruned). Resuming a stored
        study with the same ``n_trials`` runs only the trials still missing.
    timeout : float, optional
        Stop starting trials after this many seconds.
    cv : int, "source", "region", "projection", or scikit-learn splitter
        Folds; an int gives StratifiedGroupKFold when every row has a group (near-duplicate images
        never straddle folds), else StratifiedKFold, both shuffled with ``seed``. ``"source"``,
        ``"region"`` or ``"projection"`` hold out one whole source (hospital, dataset), body region or
        radiographic projection per fold, so the CV score is what the model does on one it never saw; refused when there are fewer than 2
        values, a value holds one class only, a row has none, or a near-duplicate group spans two values.
        ``FitResult.cv_by_value`` then gives each held-out value's figures with intervals.
    scoring : str or callable
        A scikit-learn scorer name or scorer; maximized.
    seed : int
        Seeds the sampler, the folds and the classifiers: same seed and data, same result (n_jobs=1).
    storage : str or optuna storage, optional
        Any Optuna storage URL, e.g. ``"sqlite:///study.db"`` or a PostgreSQL URL; with ``study_name``
        an existing study is resumed. Tuning workers on other machines may join it
        (:func:`fracfeat.tune_worker`, ``fracfeat tune-worker``): ``n_trials`` then counts every
        worker's trials, this call waits for the running ones and builds the Pipeline from the best of all.
    study_name : str, optional
    n_jobs : int
        Trials run in parallel threads (results then depend on timing).
    study : optuna.Study, optional
        Your own study (must maximize); ``storage``/``study_name``/``sampler``/``pruner`` then do not apply.
    sampler : optuna sampler, optional
        Default: ``TPESampler(seed=seed)``.
    pruner : bool or optuna pruner
        True: MedianPruner on the running mean after each fold; False: no pruning.
    threshold : None, "balanced_accuracy", or a target sensitivity ("sensitivity:0.9")
        Choose the decision threshold on out-of-fold probabilities of the training folds and keep it in
        the Pipeline (a FixedThresholdClassifier wraps the classifier).
    version : int, "latest", or "2+3"
        Store version, when ``features`` is a store; ``"2+3"`` joins versions 2 and 3
        (:func:`fracfeat.join_features`).
    weights : path, optional
        Where the backbone weights are now, if they moved since extraction (verified by sha256).
    n_threads : int, optional
        Threads per XGBoost fit.
    callbacks : list of callables, optional
        Passed to :meth:`optuna.study.Study.optimize`; each is called as ``callback(study, trial)``.
    progress : bool
        Show a bar: trial n of N, best score so far, trials pruned.
    augment : sequence of FeatureSet (or store directory / FeatureStore at its latest version), optional
        Augmented views of the same images (``extract(..., view="hflip")``, same extractor otherwise):
        each training row's views are added to the training side of every fold and to the kept model's
        training rows; validation folds and held-out splits are scored on the original images only.
        Views are matched to rows by image id (content hash), so they share the original's group.
    balance : None, "classes", "source", "region" or "projection"
        Weigh the training rows (``sample_weight`` of the classifier, in every tuning fold and in the kept
        model) so that within each source (or region) the two classes carry the same total weight, and
        every source (region) the same total; ``"classes"`` balances the classes only. A model can then
        no longer score well by learning which source or region is more often fractured. With balance
        set, the classifiers' own class weighting is not searched (``class_weight`` / ``scale_pos_weight``
        are fixed to "none"). None (default): unweighted, as before.

    Labels and leakage: an image (same bytes) labeled both ways is left out with a warning naming its
    files; rows without a group beside grouped rows get a group each (their image id); rows without a
    split beside split rows are training rows; val/test rows, and training rows with the same bytes as
    one of them, never reach tuning or the kept model.

    Returns
    -------
    FitResult
        ``.pipeline``, ``.study``, ``.best_params``, ``.cv_score``, ``.scores``, ``.version``...

    Examples
    --------
    >>> from fracfeat import extract, fit
    >>> fs = extract("data/fracatlas", store="fracfeat-store")       # doctest: +SKIP
    >>> result = fit(fs, classifier="auto", n_trials=50)              # doctest: +SKIP
    >>> result.pipeline.predict_proba(["new_radiograph.jpg"])         # doctest: +SKIP
    """
    optuna = require("optuna", why="fit")

    t_start = time.perf_counter()
    classifier, scorer = check_tuning(classifier, n_trials, cv, scoring, threshold, seed=seed, storage=storage)
    check_balance(balance)
    fs = as_feature_set(features, version)
    check_finite_rows(fs.X, fs.paths, what="fit", fix=bad_rows_fix(fs.store))
    if preset is not None:
        check_features(preset, fs)
    t = _tuning_inputs(fs, classifier, cv, scoring, scorer, seed, augment, balance, n_threads)
    data, held_out, folds, grouped, X, y, views, training, ctx = (
        t.data, t.held_out, t.folds, t.grouped, t.X, t.y, t.views, t.training, t.ctx)
    with quiet_optuna():
        study = _make_study(study, storage, study_name, sampler, pruner, seed, t.tag)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        remaining = n_trials - len(study.get_trials(deepcopy=False, states=finished))
        if remaining > 0:
            # Tuning workers (tune_worker) may share a stored study: the total, not this call's, stops at n_trials.
            shared = [optuna.study.MaxTrialsCallback(n_trials, states=finished)] if storage is not None else []
            with TrialProgress(remaining, scoring=str(scoring), enabled=progress, timeout=timeout) as bar, \
                    _class_weights_fixed(study, balance is not None):
                study.optimize(t.objective, n_trials=remaining, timeout=timeout, n_jobs=n_jobs,
                               callbacks=[*(callbacks or ()), *shared, bar])
        if storage is not None:
            wait_for_running_trials(study)
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise ConfigError(f"no trial of study {study.study_name!r} completed (timeout={timeout}); "
                          f"give more time or trials")
    best = study.best_trial
    family, head, chosen, oof = _final_head(best.params, classifier, ctx, threshold, X, y, folds, training,
                                            out_of_fold=isinstance(cv, str))
    scores = {"cv": float(best.value)}
    for split, hs in held_out.items():
        scores[split] = float(scorer(head, hs.X, hs.y)) if len(np.unique(hs.y)) == 2 else None
    pipeline = _with_feature_step(head, fs, weights)
    pipeline.outside_training_ = _shift_alarm(X, data)
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)}
    by_value = None
    if isinstance(cv, str):
        pred = (oof >= (0.5 if chosen is None else chosen)).astype(np.int64)
        by_value = per_value_metrics(y, oof, pred, values_of(data, cv), data.groups if grouped else None, seed=seed)
    result = FitResult(
        pipeline=pipeline, study=study, best_params=dict(best.params), cv_score=float(best.value), classifier=family,
        scoring=str(scoring), scores=scores, threshold=chosen, n_train=int(len(y)) * (1 + len(views)),
        cv_folds=len(folds), augment=tuple(v for v, _ in views),
        grouped=grouped, trials=counts, store=fs.store,
        version=fs.version if fs.version is not None else fs.version_label, fingerprint=fs.fingerprint,
        seconds=round(time.perf_counter() - t_start, 3), fold_scores=list(best.user_attrs.get("fold_scores", [])),
        alarms=_ranking_alarms(scoring, scores, y, held_out), balance=balance, cv_by_value=by_value,
        cv_by=cv if isinstance(cv, str) else None,
    )
    log.info("%r", result)
    return result


# Above this many training rows a kernel SVM is not tuned: its fit time grows about as rows^2, where logistic
# regression and XGBoost grow about linearly (benchmarks/scale.py, docs/scale.md: one RBF-SVM fit on 512-wide rows
# took 2.1 s at 4,000 rows and 7.0 s at 8,000; at 20,000 that is about a minute a fit, hours per study).
# "auto" leaves it out there; classifier="svm" warns.
SVM_MAX_ROWS = 20_000
SVM_FIT_NOTE = "one RBF-SVM fit on 512-wide rows took 7.0 s at 8,000 rows, logistic regression 0.6 s"


def scalable_families(classifier: str, n_rows: int) -> tuple[str, ...] | None:
    """The families "auto" searches on ``n_rows`` rows when that is not all of them (None: all, or one family)."""
    if n_rows <= SVM_MAX_ROWS or classifier not in ("auto", "svm"):
        return None
    if classifier == "svm":
        log.warning("classifier=svm on %d rows: a kernel SVM's fit time grows about as rows^2 (%s); above %d rows "
                    "tune logreg or xgboost instead, which grow about linearly (docs/scale.md)", n_rows,
                    SVM_FIT_NOTE, SVM_MAX_ROWS)
        return None
    log.info("classifier=auto on %d rows: the kernel SVM is left out above %d rows (its fit time grows about as "
             "rows^2); logreg and xgboost are searched (docs/scale.md)", n_rows, SVM_MAX_ROWS)
    return tuple(f for f in FAMILIES if f != "svm")


HEARTBEAT_S = 10  # a tuning process's trials beat this often; one silent for GRACE_S died, and its trial fails
GRACE_S = 60


def rdb_storage(storage):
    """An Optuna storage URL as an RDBStorage whose trials send heartbeats, so a killed tuning worker's
    RUNNING trial is failed (after :data:`GRACE_S`) instead of waited for; storage objects as given."""
    if not isinstance(storage, str):
        return storage
    import optuna

    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def wait_for_running_trials(study, poll_s: float = 0.5) -> None:
    """Wait until no trial of ``study`` runs (other workers' trials finish, dead workers' fail by heartbeat),
    so the best trial is chosen among all of them."""
    import optuna

    running = (optuna.trial.TrialState.RUNNING,)
    while study.get_trials(deepcopy=False, states=running):
        optuna.storages.fail_stale_trials(study)
        time.sleep(poll_s)


@dataclass
class TuningInputs:
    """What a study's trials need, made the same way by :func:`fit` and :func:`tune_worker`."""

    data: FeatureSet
    held_out: dict
    folds: list
    grouped: bool
    X: np.ndarray
    y: np.ndarray
    views: list
    training: object
    ctx: SearchContext
    tag: dict  # the study's "fracfeat" user attribute: data and settings its trials were made on
    objective: object


def _tuning_inputs(fs: FeatureSet, classifier, cv, scoring, scorer, seed, augment, balance, n_threads) -> TuningInputs:
    data, held_out = _tuning_rows(fs)
    folds, grouped = make_folds(data, cv, seed)
    X, y = np.asarray(data.X, dtype=np.float32), np.asarray(data.y)
    views = augmented_rows(data, fs, augment)
    training = _training_rows(X, y, [Xv for _, Xv in views], _balance_values(data, balance))
    ctx = SearchContext(seed=seed, n_positive=int((y == 1).sum()), n_negative=int((y == 0).sum()), n_threads=n_threads,
                        n_features=int(X.shape[1]))
    tag = {"classifier": classifier, "scoring": str(scoring), "seed": int(seed), "fingerprint": fs.fingerprint,
           "n_rows": int(len(y)), "n_positive": ctx.n_positive, "cv": len(folds) if isinstance(cv, int) else repr(cv),
           "grouped": grouped, "rows_sha256": _rows_digest(data)}
    if views:
        tag["augment"] = ",".join(v for v, _ in views)
    if balance is not None:
        tag["balance"] = balance
    objective = _objective(classifier, ctx, folds, training, scorer, X, y)
    return TuningInputs(data, held_out, folds, grouped, X, y, views, training, ctx, tag, objective)


def _study_tag(storage, study_name: str, wait: float) -> dict:
    """The settings a stored study was started with (its "fracfeat" attribute), waiting up to ``wait`` seconds
    for the study to appear (workers may start before the caller that creates it)."""
    import optuna

    deadline = time.monotonic() + wait
    for attempt in itertools.count():
        if study_name in optuna.get_all_study_names(storage):
            tag = optuna.load_study(study_name=study_name, storage=storage).user_attrs.get("fracfeat")
            if tag is not None:
                return tag
        if attempt == 0 and wait > 0:
            log.info("study %r is not started yet; waiting up to %gs for it", study_name, wait)
        if time.monotonic() >= deadline:
            raise ConfigError(f"no fracfeat study {study_name!r} in {storage} after {wait:g}s: start it with "
                              f"`fracfeat fit STORE --storage URL --study-name {study_name}` (or fit(storage=..., "
                              f"study_name=...)), or give the name it was started with")
        time.sleep(1.0)


def _cv_of_tag(tag: dict):
    cv = tag["cv"]
    if isinstance(cv, int) or str(cv).isdigit():
        return int(cv)
    if cv in ("'source'", "'region'"):
        return cv.strip("'")
    raise ConfigError(f"the study was tuned with cv={cv}: tuning workers take only a number of folds, source or "
                      f"region; run its trials in the fit call itself")


def tune_worker(features, *, storage, study_name: str, n_trials: int, version="latest", timeout: float | None = None,
                wait: float = 600.0, n_threads: int | None = None, progress: bool = False) -> int:
    """Run trials of a stored study that :func:`fit` started, from another process or machine.

    The study's classifier, scoring, seed, folds and row weighting are read from the study; ``features``
    must be the very rows it was started on (else ConfigError: the study's data tag differs). Trials run
    until the study holds ``n_trials`` complete or pruned ones (all workers together: Optuna's RDB storage
    hands each trial to one process). This worker's sampler is seeded apart from the others' so no two
    processes propose the same parameters; the best trial therefore depends on timing, as with ``n_jobs``.
    The caller's :func:`fit` (same ``storage``, ``study_name``, ``n_trials``) builds the final Pipeline, once.

    Returns
    -------
    int
        The trials this worker ran.
    """
    optuna = require("optuna", why="tune_worker")
    check_storage(storage)
    with quiet_optuna():
        tag = _study_tag(rdb_storage(storage), study_name, wait)
        if "augment" in tag:
            raise ConfigError(f"study {study_name!r} trains on augmented views ({tag['augment']}): tuning workers do "
                              f"not take views yet; run its trials in the fit call")
        classifier, scorer = check_tuning(tag["classifier"], n_trials, _cv_of_tag(tag), tag["scoring"], None,
                                          seed=tag["seed"], storage=storage)
        fs = as_feature_set(features, version)
        t = _tuning_inputs(fs, classifier, _cv_of_tag(tag), tag["scoring"], scorer, tag["seed"], (),
                           tag.get("balance"), n_threads)
        sampler = optuna.samplers.TPESampler(seed=None)  # OS entropy: two workers never share a sampler's draws
        study = _make_study(None, storage, study_name, sampler, True, tag["seed"], t.tag)
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished))
        if done >= n_trials:
            return 0
        with TrialProgress(n_trials - done, scoring=tag["scoring"], enabled=progress, timeout=timeout) as bar, \
                _class_weights_fixed(study, "balance" in tag):
            mine: list[int] = []
            study.optimize(t.objective, n_trials=n_trials - done, timeout=timeout,
                           callbacks=[lambda _, trial: mine.append(trial.number),
                                      optuna.study.MaxTrialsCallback(n_trials, states=finished), bar])
    log.info("tuning worker: %d trials run into study %r", len(mine), study_name)
    return len(mine)


def _training_rows(X, y, views: list, values):
    """``training(rows)``: the training side's (feature rows, labels, row weights or None).

    The rows plus each one's augmented views (which share its label and weight); the weights
    (:func:`balance_weights` over ``values``) are computed on the rows of each training side.
    """
    def training(rows):
        weights = None if values is None else balance_weights(y[rows], values[rows])
        if not views:
            return X[rows], y[rows], weights
        copies = 1 + len(views)
        return (np.concatenate([X[rows], *(Xv[rows] for Xv in views)]), np.tile(y[rows], copies),
                None if weights is None else np.tile(weights, copies))
    return training


def _objective(classifier, ctx: SearchContext, folds, training, scorer, X, y):
    """The Optuna objective: the mean score of a trial's model over the folds, pruned after any fold."""
    import optuna
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    families = scalable_families(classifier, len(y))

    def objective(trial):
        if families is None:
            family, steps = suggest_steps(trial, classifier, ctx)
        else:  # "auto" on many rows: the same search, the kernel SVM left out
            family = trial.suggest_categorical("classifier", families)
            steps = FAMILIES[family](trial, ctx)
        model = Pipeline(steps)
        scores = []
        for k, (tr, va) in enumerate(folds):
            with _quiet_convergence():  # convergence warnings of poor trials: the score says it
                fitted = fit_weighted(clone(model), *training(tr))
                scores.append(float(scorer(fitted, X[va], y[va])))
            trial.report(float(np.mean(scores)), k)
            if k < len(folds) - 1 and trial.should_prune():
                trial.set_user_attr("fold_scores", scores)
                raise optuna.TrialPruned()
        trial.set_user_attr("fold_scores", scores)
        trial.set_user_attr("family", family)
        return float(np.mean(scores))
    return objective


@contextlib.contextmanager
def _class_weights_fixed(study, fixed: bool):
    """While tuning with row weights, the study's sampler keeps the classifiers' class weighting off."""
    if not fixed:
        yield
        return
    import optuna

    before = study.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.PartialFixedSampler(UNWEIGHTED_CLASSES, before)
    try:
        yield
    finally:
        study.sampler = before


def fit_weighted(model, X, y, weights=None):
    """``model.fit(X, y)``; with ``weights``, each row's weight goes to the Pipeline's classifier step.

    Scaling and PCA are fitted unweighted; the classifier (also inside the FixedThresholdClassifier
    that keeps a threshold, or the SVM's :class:`SigmoidCalibrated`) gets ``sample_weight``.
    """
    if weights is None:
        return model.fit(X, y)
    name, clf = model.steps[-1]
    if not _wraps_classifier(clf):
        return model.fit(X, y, **{f"{name}__sample_weight": weights})
    _fit_classifier_weighted(clf, model[:-1].fit_transform(X, y), y, weights)
    return model


def _wraps_classifier(clf) -> bool:
    from sklearn.model_selection import FixedThresholdClassifier

    from ._calibration import SigmoidCalibrated

    return isinstance(clf, (FixedThresholdClassifier, SigmoidCalibrated))


def _fit_classifier_weighted(clf, X, y, weights):
    """Fit a classifier, or the classifier a wrapper holds, with ``sample_weight`` (which the wrappers lack)."""
    from sklearn.base import clone
    from sklearn.model_selection import FixedThresholdClassifier, StratifiedKFold, cross_val_predict

    from ._calibration import SigmoidCalibrated, fit_increasing_sigmoid

    if isinstance(clf, FixedThresholdClassifier):
        clf.estimator_ = _fit_classifier_weighted(clone(clf.estimator), X, y, weights)
    elif isinstance(clf, SigmoidCalibrated):
        # SigmoidCalibrated.fit, with the weights passed to each fit of its estimator.
        clf.classes_ = np.unique(y)
        positive = y == clf.classes_[1]
        n_splits = max(2, min(int(clf.cv), int(positive.sum()), int((~positive).sum())))
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=clf.random_state)
        decision = cross_val_predict(clone(clf.estimator), X, y, cv=folds, method="decision_function",
                                     params={"sample_weight": weights})
        clf.slope_, clf.intercept_ = fit_increasing_sigmoid(decision, positive)
        clf.estimator_ = clone(clf.estimator).fit(X, y, sample_weight=weights)
    else:
        return clf.fit(X, y, sample_weight=weights)
    if hasattr(clf.estimator_, "n_features_in_"):
        clf.n_features_in_ = clf.estimator_.n_features_in_
    return clf


def _shift_alarm(X, data: FeatureSet):
    """The Pipeline's shift alarm, fitted on the training rows (None, with a note, when they are too few)."""
    from ._shift import OutsideTraining

    try:
        return OutsideTraining().fit(X, groups=data.groups if data.has_groups else None)
    except ConfigError as e:
        log.info("no shift alarm in this model: %s", e)
        return None


def _tuning_rows(fs: FeatureSet) -> tuple[FeatureSet, dict]:
    """(the labeled rows to tune on, {split: rows} held out).

    Rows of the val and test splits are held out: tuning and the kept model never see them, nor an image
    with the same bytes. When some rows have a split, those without one are training rows (a warning
    says so). :func:`~fracfeat._featureset.labeled_for_training` drops images labeled both ways first.
    """
    data = labeled_for_training(fs)
    if data.y is None or len(np.unique(data.y)) < 2:
        raise ConfigError(f"fit needs labeled images of both classes; {fs!r} has "
                          f"{'none labeled' if data.y is None or not len(data) else 'one class only'}")
    held_names = [s for s in ("val", "test") if s in data.split_names]
    if not held_names and "train" not in data.split_names:
        return data, {}
    held_out = {s: data.split(s) for s in held_names}
    splits = np.asarray(data.splits).astype(str)
    training = ~np.isin(splits, held_names)
    unsplit = int((training & (splits == "")).sum())
    if unsplit:
        log.warning("%d labeled row%s no split beside rows of the %s split%s: used as training rows", unsplit,
                    "s have" if unsplit > 1 else " has", "/".join(data.split_names), "s" if len(data.split_names) > 1 else "")
    held_ids = {str(i) for hs in held_out.values() for i in hs.ids}
    leaked = training & np.array([str(i) in held_ids for i in data.ids], dtype=bool)
    if leaked.any():
        log.warning("%d training row%s the same image (same bytes) as a %s row: left out of training (%s)",
                    int(leaked.sum()), "s are" if leaked.sum() > 1 else " is", "/".join(held_names),
                    ", ".join(map(str, data.paths[leaked][:3])))
    return data.subset(training & ~leaked), held_out


def _final_head(params: dict, classifier: str, ctx: SearchContext, threshold, X, y, folds, training,
                out_of_fold: bool = False):
    """(family, the best trial's model fitted on every training row, its decision threshold or None,
    the out-of-fold P(fractured) or None).

    The threshold is chosen on the out-of-fold probabilities of the training folds (models of the kept
    kind, fitted without each fold), then kept by a FixedThresholdClassifier around the classifier.
    Those probabilities are also returned when ``out_of_fold`` is asked for.
    """
    import optuna
    from sklearn.model_selection import FixedThresholdClassifier
    from sklearn.pipeline import Pipeline

    final = SearchContext(**{**ctx.__dict__, "final": True})
    family, steps = suggest_steps(optuna.trial.FixedTrial(params), classifier, final)
    head = Pipeline(steps)
    chosen, proba = None, None
    if threshold is not None or out_of_fold:
        proba = _out_of_fold_proba(head, X, y, folds, training)
    if threshold is not None:
        chosen = choose_threshold(y, proba, threshold)
        name, clf = head.steps[-1]
        head.steps[-1] = (name, FixedThresholdClassifier(clf, threshold=chosen, response_method="predict_proba"))
    with _quiet_convergence():
        fit_weighted(head, *training(np.arange(len(y))))
    return family, head, chosen, proba


def _ranking_alarms(scoring, scores: dict, y: np.ndarray, held_out: dict) -> list[str]:
    """Plain-words warnings (logged) for a CV or held-out ROC AUC far below chance."""
    if scoring != "roc_auc":
        return []
    counts = {"cv": y, **{split: hs.y for split, hs in held_out.items()}}
    alarms = []
    for split, value in scores.items():
        labels = counts[split]
        where = "the cross-validation folds" if split == "cv" else f"the {split} split"
        alarm = ranking_alarm(value, int((labels == 1).sum()), int((labels == 0).sum()), where)
        if alarm:
            log.warning("%s", alarm)
            alarms.append(alarm)
    return alarms


def augmented_rows(data: FeatureSet, fs: FeatureSet, augment) -> list[tuple[str, np.ndarray]]:
    """``[(view name, rows aligned with data's rows)]`` for each augmented view set, checked.

    A view set must come from the same extractor as ``fs`` except its ``view``, and hold every row
    of ``data`` (matched by image id); anything else is a ConfigError that says what to extract.
    """
    if augment is None or isinstance(augment, (FeatureSet, FeatureStore, str, bytes)) or hasattr(augment, "__fspath__"):
        augment = () if augment is None else (augment,)
    if not augment:
        return []
    try:
        base, base_view = _settings_and_view(fs)
    except ConfigError as e:
        raise ConfigError(f"augment= needs features from a store version (their provenance says how they were "
                          f"made): {e}") from None
    out, seen = [], set()
    for item in augment:
        vs = as_feature_set(item)
        other, name = _settings_and_view(vs)
        if not name or name == base_view:
            raise ConfigError(f"augment: {vs!r} holds the images themselves, not an augmented view; extract one "
                              f"with view='hflip' (or 'rot+10', 'crop0.8') and pass that")
        if len(other) != len(base):
            raise ConfigError(f"augment: view {name!r} joins {len(other)} extractors' features, the training "
                              f"features {len(base)}; extract the view with the same settings")
        differing = sorted({k for mine, theirs in zip(base, other) for k in set(mine) | set(theirs)
                            if mine.get(k) != theirs.get(k)})
        if differing:
            raise ConfigError(f"augment: view {name!r} was extracted with other settings than the training "
                              f"features ({', '.join(differing)} differ); extract it with the same settings")
        if name in seen:
            raise ConfigError(f"augment: view {name!r} is given twice")
        seen.add(name)
        rows, missing = vs.rows_of(data.ids)
        if missing:
            raise ConfigError(f"augment: view {name!r} (version {vs.version}) lacks {missing} of the {len(data)} "
                              f"training images; extract the view over the same images")
        out.append((name, np.asarray(vs.X, dtype=np.float32)[rows]))
    return out


def _settings_and_view(fs: FeatureSet) -> tuple[list[dict], str]:
    """(each part's extractor settings but its view, the view) of a feature set.

    One part for a store version's features, one per part for joined ones (the view of all parts;
    "mixed" when they differ, which no extract call makes).
    """
    configs = [part.config for part in fs.parts]
    settings = [{k: v for k, v in c.as_dict().items() if k != "view"} for c in configs]
    views = {c.view for c in configs}
    return settings, views.pop() if len(views) == 1 else "mixed"


def _rows_digest(fs: FeatureSet) -> str:
    """Identity of the tuning rows, so a resumed study is not fed other data."""
    import hashlib

    h = hashlib.sha256()
    for values in (fs.ids, fs.y, fs.groups):
        h.update("\x1f".join(map(str, values)).encode())
    return h.hexdigest()


def _out_of_fold_proba(head, X, y, folds, training) -> np.ndarray:
    """P(fractured) of every row from a clone of ``head`` fitted on the folds that hold it out."""
    from sklearn.base import clone

    proba = np.empty(len(y), dtype=np.float64)
    for tr, va in folds:
        with _quiet_convergence():
            proba[va] = fit_weighted(clone(head), *training(tr)).predict_proba(X[va])[:, 1]
    return proba


def _with_feature_step(head, fs: FeatureSet, weights):
    """[the image-reading feature step] + head, when the features say how they were made (store versions)."""
    from sklearn.pipeline import Pipeline

    from ._transformer import feature_step

    if not all(part.has_extractor for part in fs.parts):
        warnings.warn("the feature set carries no extractor provenance: the Pipeline takes feature arrays, "
                      "not image paths", stacklevel=3)
        return head
    deep = feature_step(fs.parts, weights)
    deep.trained_on_ = {"store": fs.store, "version": fs.version_label if fs.is_joined else fs.version,
                        "fingerprint": fs.fingerprint, "classes": list(fs.classes),
                        "sources": sorted(set(fs.sources.tolist()) - {""})}
    return Pipeline([("features", deep), *head.steps])