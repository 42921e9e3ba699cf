"""run(): the main job in one call: extract, tune on training images, evaluate on held-out ones, save, report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ._errors import ConfigError
from ._extract import extract
from ._featureset import FeatureSet, labeled_for_training
from ._fit import fit
from ._model_io import check_output_file, check_output_folder, save_model
from ._presets import get_preset, preset_defaults, settings_text
from ._report import report
from ._views import check_view

log = logging.getLogger("fracfeat")

HOLDOUT = "held-out"
# The main job's default tuning budget: 20 trials of XGBoost. On all of FracAtlas it tuned in about 8 min on
# 2 cores, where the former default (50 trials of the three families, XGBoost's dominating) took 47 min, and
# held out it scored as well; 30 SVM trials take under a minute and score a little lower. Figures of all
# three: README, "Run the main job".
DEFAULT_CLASSIFIER = "xgboost"
DEFAULT_TRIALS = 20


@dataclass
class RunResult:
    """What :func:`run` made.

    Attributes
    ----------
    model_path, report_path : Path
        The saved Pipeline (``joblib``) and the report's ``index.html``.
    metrics : dict
        :func:`fracfeat.evaluate`'s metrics of the held-out images.
    holdout : str
        How the held-out images were chosen.
    fit : FitResult
        The tuning result (study, best parameters, CV score).
    features : FeatureSet
        Every image's features, as extracted.
    """

    model_path: Path
    report_path: Path
    metrics: dict
    holdout: str
    fit: object
    features: FeatureSet


def holdout_split(fs: FeatureSet, test_size: float = 0.2, seed: int = 0) -> tuple[FeatureSet, FeatureSet, str, bool]:
    """(training rows, held-out rows, how they were chosen, whether groups kept near-duplicates together).

    The source's own ``test`` split when it has one; otherwise one fold of a stratified, grouped
    K-fold (K = round(1 / test_size)), so images of one group (near-duplicates) stay on one side.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if "test" in fs.split_names:
        return (fs.subset(fs.splits != "test"), fs.split("test"),
                f"the source's test split ({int((fs.splits == 'test').sum())} images)", True)
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"test_size={test_size!r}: give a fraction between 0 and 1, e.g. 0.2")
    n_splits = max(2, int(round(1.0 / test_size)))
    smallest = int(np.bincount(fs.y, minlength=2).min())
    if smallest < n_splits:
        raise ConfigError(f"a {test_size:.0%} hold-out needs at least {n_splits} images of each class; the smaller "
                          f"class has {smallest}. Add images or raise test_size.")
    grouped = fs.has_groups
    groups = fs.groups if grouped else np.arange(len(fs)).astype(str)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, test_rows = next(splitter.split(fs.X, fs.y, groups))
    mask = np.zeros(len(fs), bool)
    mask[test_rows] = True
    held = fs.subset(mask)
    held = replace(held, splits=np.full(len(held), HOLDOUT, dtype=object))
    how = (f"a {mask.mean():.0%} stratified hold-out ({mask.sum()} images, seed {seed})"
           + (", grouped: near-duplicate groups never straddle it" if grouped else
              ", not grouped: the source has no groups"))
    return fs.subset(~mask), held, how, grouped


@preset_defaults("extract", "fit")
def run(
    source,
    out,
    *,
    preset=None,
    store=None,
    classifier: str = DEFAULT_CLASSIFIER,
    n_trials: int = DEFAULT_TRIALS,
    timeout: float | None = None,
    cv=5,
    scoring: str = "roc_auc",
    seed: int = 0,
    threshold="balanced_accuracy",
    test_size: float = 0.2,
    storage=None,
    study_name: str | None = None,
    augment=(),
    balance=None,
    progress: bool = True,
    **extract_options,
) -> RunResult:
    """Extract features of ``source``, tune a classifier, evaluate it on held-out images, save model and report.

    Held-out images are the source's ``test`` split when it has one, else a stratified hold-out of
    ``test_size`` that keeps each group of near-duplicates on one side. They reach neither tuning nor
    training.

    Parameters
    ----------
    source : str, Path, list of paths, or mapping
        Labeled images, as :func:`fracfeat.extract` takes them; ``{name: source, ...}`` for several
        sources together (each row keeps its source's name, for ``cv="source"`` and ``balance="source"``).
    out : str or Path
        Output folder: ``model.joblib``, ``report/index.html`` and (unless ``store`` is given) ``store/``.
    preset : str or Preset, optional
        A named preset (:func:`fracfeat.presets`), e.g. ``"fracatlas-vgg16-svm"``: its extractor and
        tuning settings fill every one this call does not pass; keywords given win. ``weights`` is never
        part of a preset: pass it.
    store : str or Path, optional
        Feature store folder (default ``OUT/store``); a shared store reuses features across runs.
    classifier, n_trials, timeout, cv, scoring, seed, threshold, storage, study_name, balance
        Tuning settings, as for :func:`fracfeat.fit` (``cv="source"``, ``"region"`` or ``"projection"``: leave one
        out; ``balance=`` the same names: equal class weight within each). The default budget, 20 trials of XGBoost, tuned all
        of FracAtlas (4,083 images) in under 7 minutes on 2 cores (``classifier="svm", n_trials=30``: under
        a minute, a little lower held out). ``threshold`` defaults to the one
        that maximizes balanced accuracy on the training folds: about 18% of radiographs are fractured,
        and the default 0.5 then sacrifices sensitivity.
    test_size : float
        Share of images held out when the source has no test split.
    augment : sequence of str, optional
        Augmented views to train on, e.g. ``("hflip",)``: each is extracted from ``source`` with the
        same settings (:func:`fracfeat.extract` ``view=``) and the training images' views join every
        training fold and the kept model (:func:`fracfeat.fit` ``augment=``). Held-out images and the
        saved model see the original images only.
    progress : bool
        Progress bars for extraction and tuning.
    **extract_options
        Extraction settings, as :func:`fracfeat.extract` takes them: ``backbone``, ``weights``,
        ``image_size``, ``pooling``, ``tiles``, ``scales``, ``layers``, ``join``, ``batch_size``, ``precision``,
        ``runtime``, ``class_map``...

    Returns
    -------
    RunResult

    Examples
    --------
    >>> from fracfeat import run
    >>> result = run("data/fracatlas", "results/", weights="vgg16_notop.weights.h5")   # doctest: +SKIP
    >>> result.metrics["held-out"]["roc_auc"], result.report_path                      # doctest: +SKIP
    >>> run("data/fracatlas", "results/", weights="vgg16_notop.weights.h5",
    ...     preset="fracatlas-vgg16-svm")                                              # doctest: +SKIP
    """
    out = Path(check_output_folder(out, "out"))  # where the results go, checked before any work
    check_output_file(out / "model.joblib", "the model file")
    check_output_folder(out / "report", "the report folder")
    store = out / "store" if store is None else store
    if isinstance(augment, str):
        augment = [v for v in augment.replace(" ", "").split(",") if v]
    augment = [check_view(v) for v in augment or ()]  # bad names fail before any image is read
    if "view" in extract_options:
        raise ConfigError("run trains on the images themselves: pass views to train on as augment=('hflip',), "
                          "not view=")
    fs = extract(source, store=store, progress=progress, **extract_options)
    views = [extract(source, store=store, progress=progress, view=v, **extract_options) for v in augment]
    labeled = labeled_for_training(fs)
    if labeled.y is None or len(np.unique(labeled.y)) < 2:
        raise ConfigError(f"run needs labeled images of both classes; {fs!r} has "
                          f"{'none labeled' if labeled.y is None or not len(labeled) else 'one class only'}. "
                          f"Give class folders (fractured/, not_fractured/) or a CSV with a label column.")
    train, held, how, grouped = holdout_split(labeled, test_size, seed)
    notes = []
    if not grouped:
        notes.append("The source has no groups, so near-duplicate radiographs may sit on both sides of the hold-out "
                     "and of the CV folds, which flatters every score. Give a CSV manifest with a group column.")
        log.warning("%s has no groups: near-duplicate images may straddle the hold-out (give a CSV manifest "
                    "with a group column)", source)
    log.info("tuning on %d images, holding out %s", len(train), how)
    result = fit(train, classifier=classifier, n_trials=n_trials, timeout=timeout, cv=cv, scoring=scoring, seed=seed,
                 threshold=threshold, storage=storage, study_name=study_name, progress=progress, augment=views,
                 balance=balance)
    model_path = out / "model.joblib"
    save_model(result.pipeline, model_path)  # makes out/
    joined = " (joined)" if fs.is_joined else ""
    summary = {
        "data": f"{fs.provenance.get('source', source)}: {len(fs)} images ({int((fs.y == 1).sum())} "
                f"{fs.classes[1]}), {len(fs.failures)} unreadable",
        "hold-out": how,
        "store version": f"{fs.store} v{fs.version_label}{joined}",
        "model file": str(model_path),
    }
    if views:
        summary["augmented views"] = (f"{', '.join(augment)}: the training images' views joined every training fold "
                                      f"and the kept model ({result.n_train} training rows)")
    if preset is not None:
        summary["preset"] = _preset_line(preset, {**extract_options, "classifier": classifier, "n_trials": n_trials,
                                                  "cv": cv, "scoring": scoring, "threshold": threshold})
    backbones = "+".join(dict.fromkeys(part.provenance.get("backbone") for part in fs.parts))
    page, metrics = report(result, held, out / "report", summary=summary, notes=notes,
                           title=f"fracfeat: {backbones} features{joined}, "
                                 f"{result.classifier} classifier")
    log.info("model: %s; report: %s", model_path, page)
    return RunResult(model_path=model_path, report_path=page, metrics=metrics, holdout=how, fit=result, features=fs)


def _preset_line(preset, settings: dict) -> str:
    """The preset's name, and the settings this run changed (its figures do not describe those)."""
    chosen = get_preset(preset)
    changed = {k: given for k, (given, _) in chosen.departures(settings).items()}
    return chosen.name + (f", except {settings_text(changed)}" if changed else "")
