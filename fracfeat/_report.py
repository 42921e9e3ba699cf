"""The HTML report page.

:func:`write_report` puts the plots of :mod:`fracfeat._plots` on one self-contained page:
``DIR/index.html`` next to its PNGs, plus ``metrics.json`` and ``predictions.csv`` for scripts, with
the summary and metrics tables and the notes. :func:`report` evaluates a model on labeled data and
writes that page.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ._errors import ConfigError, FracfeatError
from ._explain import explain_each
from ._featureset import DEFAULT_CLASSES, FeatureSet
from ._metrics import (binary_metrics, checked_metrics, predict_rows, ranking_alarms, shift_alarms,
                       split_feature_step)
from ._model_io import pipeline_of
from ._plots import (
    format_value,
    labels_and_scores,
    operating_point,
    plot_confusion_matrix,
    plot_optimization_history,
    plot_param_importances,
    plot_precision_recall,
    plot_reliability,
    plot_roc,
    plot_sample_grid,
    plot_score_distribution,
    predicted_positive,
    rule_label,
    save_figure,
    worst_first,
)

log = logging.getLogger("fracfeat")


# -- the page -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1f2328}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.2em;margin:28px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:1.5em} .card span{color:#57606a;font-size:.85em}
table{border-collapse:collapse;background:#fff;border:1px solid #d0d7de;font-size:.92em}
th,td{padding:5px 12px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#f0f2f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:16px}
figure{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px}
figure img{width:100%;height:auto;display:block} figcaption{color:#57606a;font-size:.88em;margin-top:6px}
.wide{grid-column:1/-1} code{font-size:.9em} ul.kv{margin:0;padding-left:16px}
.note{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px;margin:10px 0}
"""

_CARD_METRICS = (
    ("roc_auc", "ROC AUC"), ("balanced_accuracy", "balanced accuracy"), ("sensitivity", "sensitivity"),
    ("specificity", "specificity"), ("pr_auc", "PR AUC"), ("f1", "F1"), ("brier", "Brier score"),
    ("ece", "calibration error (ECE)"),
)


def _esc(value) -> str:
    return html.escape(str(value))


def _value_html(value) -> str:
    if isinstance(value, dict):
        if not value:
            return "<i>none</i>"
        return "<ul class=kv>" + "".join(f"<li><code>{_esc(k)}</code> = {_esc(format_value(v, 4))}</li>"
                                         for k, v in value.items()) + "</ul>"
    if isinstance(value, (list, tuple)):
        return _esc(", ".join(str(v) for v in value))
    return _esc(format_value(value, 4))


def _scalar_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """{column: {metric: value}}: a flat dict is one column; a dict of dicts is one column per key."""
    if not metrics:
        return {}
    if all(isinstance(v, dict) for v in metrics.values()):
        nested = metrics
    else:
        nested = {"held-out": metrics}
    out = {}
    for column, values in nested.items():
        out[str(column)] = {k: v for k, v in values.items()
                            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}
    return out


def _metrics_table(columns: dict[str, dict]) -> str:
    names = []
    for values in columns.values():
        names.extend(k for k in values if k not in names)
    head = "<tr><th>metric</th>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>"
    rows = "".join(
        f"<tr><td>{_esc(n)}</td>" + "".join(f"<td class=num>{_esc(format_value(columns[c].get(n, float('nan'))))}</td>"
                                            for c in columns) + "</tr>"
        for n in names
    )
    return f"<table>{head}{rows}</table>"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@dataclass(frozen=True)
class _Shown:
    """The evaluated images as the page shows them."""

    y: np.ndarray  # true labels, 0 or 1
    s: np.ndarray  # predicted probability of label 1
    pred: np.ndarray  # the model's decisions, 0 or 1
    threshold: float | None
    classes: tuple[str, str]
    op: dict  # operating_point() of those decisions

    @property
    def rule(self) -> str:
        return rule_label(self.threshold)


def _shown(y_true, scores, threshold, y_pred, classes) -> _Shown:
    y, s = labels_and_scores(y_true, scores)
    return _Shown(y=y, s=s, pred=predicted_positive(s, threshold, y_pred).astype(int), threshold=threshold,
                  classes=tuple(classes), op=operating_point(y, s, threshold, y_pred))


# One figure of the page: (PNG file name, caption, css class).
_Figure = tuple[str, str, str]


def _saved(out: Path, name: str, fig, caption: str, css: str = "") -> _Figure:
    """Write ``fig`` as ``out/name``; its entry on the page."""
    save_figure(fig, out / name)
    return name, caption, css


def _score_figures(out: Path, shown: _Shown) -> list[_Figure]:
    """The plots of the scores and decisions: confusion matrix, score distribution, ROC, precision-recall."""
    y, s, pred, threshold, classes = shown.y, shown.s, shown.pred, shown.threshold, shown.classes
    return [
        _saved(out, "confusion_matrix.png", plot_confusion_matrix(y, s, threshold, classes, pred),
               f"Rows: true class; columns: predicted class ({shown.rule}). Percentages are per row "
               f"(sensitivity is the bottom-right share, specificity the top-left)."),
        _saved(out, "score_distribution.png", plot_score_distribution(y, s, threshold, classes),
               "How far apart the model pushes the two classes; the dashed line is the decision threshold."),
        _saved(out, "roc.png", plot_roc(y, s, threshold, pred),
               "Every threshold's trade-off; the circle is the model's operating point."),
        _saved(out, "precision_recall.png", plot_precision_recall(y, s, threshold, pred),
               "Precision-recall is the honest curve for a minority class; the dashed line is what guessing achieves."),
    ]


def _reliability_figure(out: Path, shown: _Shown, sources) -> _Figure:
    """The reliability diagram of the shown rows (one curve per source when they come from several)."""
    return _saved(out, "reliability.png", plot_reliability(shown.y, shown.s, sources),
                  "Calibration: does P(fractured) mean what it says? Each point is a bin of 0.1 in predicted "
                  "probability (its number of images above it, and in the bars below) at the share of those images "
                  "that are fractured; on the dashed diagonal the probabilities are calibrated. ECE is the images' "
                  "mean gap to the diagonal, Brier the mean squared error of the probabilities (both: lower is better).")


def _tuning_figures(out: Path, study, scoring: str | None) -> list[_Figure]:
    """The plots of the Optuna study: optimization history and parameter importances."""
    return [
        _saved(out, "optimization_history.png", plot_optimization_history(study, scoring),
               "Cross-validated score of each Optuna trial (colour: classifier family when several were searched); "
               "the line is the best so far. Grey crosses: pruned trials, at their running mean over the folds "
               "done when they were stopped."),
        _saved(out, "param_importances.png", plot_param_importances(study),
               "Which hyperparameters moved the cross-validated score (fANOVA over completed trials)."),
    ]


def _sample_figure(out: Path, shown: _Shown, paths, n_samples: int, heatmaps=None) -> _Figure:
    """The grid of radiographs, worst errors first, across the page's width (each beside its heatmap)."""
    n_wrong = shown.op["fp"] + shown.op["fn"]
    maps, how = heatmaps if heatmaps is not None else (None, "")
    fig = plot_sample_grid(paths, shown.y, shown.s, shown.threshold, shown.classes, n=n_samples, y_pred=shown.pred,
                           heatmaps=maps)
    beside = (f" Beside each radiograph, its heatmap ({how}): red where the region pushed p up; it shows where "
              f"the model looked, not whether it looked at the fracture." if maps is not None else "")
    return _saved(out, "samples.png", fig,
                  f"Worst errors first: {n_wrong} of {len(shown.y)} images are misclassified ({shown.rule}). "
                  f"Red: wrong, green: right; p is the predicted probability of {shown.classes[1]}.{beside}", "wide")


def sample_heatmaps(pipeline, paths, y_true, scores, n_samples: int):
    """``({index: map}, method)`` for the radiographs the sample grid shows, or None when none can be made
    (a model that takes feature arrays, images no longer on disk: the grid is drawn without them)."""
    if split_feature_step(pipeline)[0] is None:
        return None  # a classifier of feature arrays: nothing reads the images
    order = worst_first(y_true, scores)[:n_samples]
    try:
        maps, method, failures, _ = explain_each(pipeline, [str(paths[i]) for i in order])
    except (FracfeatError, OSError) as e:
        log.warning("the report's radiographs are shown without heatmaps: %s", e)
        return None
    if failures:
        log.warning("%d of the report's %d radiographs cannot be read for their heatmaps", len(failures), len(order))
    found = {int(i): m for i, m in zip(order, maps) if m is not None}
    return (found, method) if found else None


def _write_metrics_json(path: Path, shown: _Shown, metrics: dict | None, summary: dict | None) -> None:
    with open(path, "w") as f:
        json.dump({"threshold": shown.threshold, "operating_point": shown.op, "metrics": metrics or {},
                   "summary": summary or {}}, f, indent=2, default=_json_default)


def _write_predictions_csv(path: Path, shown: _Shown, paths) -> None:
    """One row per image: its path, true and predicted class, probability, and whether it was right."""
    classes = shown.classes
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true_label", "probability", "predicted_label", "correct"])
        for p, yi, si, pi in zip(paths, shown.y, shown.s, shown.pred):
            w.writerow([p, classes[yi], f"{si:.6f}", classes[pi], int(pi == yi)])


def _cards_html(shown: _Shown) -> str:
    """The headline metrics, computed from the plotted rows themselves."""
    values = binary_metrics(shown.y, shown.pred, shown.s, shown.classes)
    cards = "".join(f"<div class=card><b>{_esc(format_value(values[k]))}</b><span>{_esc(label)}</span></div>"
                    for k, label in _CARD_METRICS if values.get(k) is not None)
    return f"<div class=cards>{cards}</div>"


def _heading_html(shown: _Shown, title: str, notes) -> str:
    """Title, what was evaluated and when, the notes, and the metric cards."""
    y, classes = shown.y, shown.classes
    n_pos = int(np.sum(y == 1))
    return "".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        f"<p class=sub>{len(y)} evaluated images ({n_pos} {_esc(classes[1])}, {len(y) - n_pos} {_esc(classes[0])}) · "
        f"{_esc(shown.rule)} · written {_esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
        "".join(f"<div class=note>{_esc(n)}</div>" for n in notes),
        _cards_html(shown),
    ])


def _tables_html(summary: dict | None, metrics: dict | None, subgroups: dict | None = None) -> str:
    """The summary table, the metrics table when there are scalar metrics, then a table per subgroup grouping."""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in (summary or {}).items())
    columns = _scalar_metrics(metrics or {})
    return (f"<h2>Summary</h2><table>{rows}</table>" + (f"<h2>Metrics</h2>{_metrics_table(columns)}" if columns else "")
            + "".join(_subgroup_table(key, values) for key, values in (subgroups or {}).items() if values))


# Columns of a subgroup table: (heading, metric key, with its interval).
SUBGROUP_COLUMNS = (
    ("n", "n", False), ("positives", "n_positive", False), ("ROC AUC [95% CI]", "roc_auc", True),
    ("sensitivity [95% CI]", "sensitivity", True), ("specificity [95% CI]", "specificity", True),
    ("Brier", "brier", False), ("outside training", "outside_training", False),
)


def with_interval(metrics: dict, key: str, interval: bool = True) -> str:
    """A subgroup's figure as tables show it: ``0.812 [0.701, 0.902]``; "n/a" where it is undefined (a
    subgroup of one class has no ROC AUC)."""
    value = metrics.get(key)
    if value is None:
        return "n/a"
    text = format_value(value)
    ci = (metrics.get("intervals") or {}).get(key) if interval else None
    return f"{text} [{format_value(ci['low'])}, {format_value(ci['high'])}]" if ci else text


def _subgroup_table(key: str, values: dict) -> str:
    """The per-``key`` table (per source, per region, per projection) of the shown split's subgroups."""
    head = f"<tr><th>{_esc(key)}</th>" + "".join(f"<th>{_esc(h)}</th>" for h, _, _ in SUBGROUP_COLUMNS) + "</tr>"
    rows = "".join(
        f"<tr><td>{_esc(value or '(not given)')}</td>"
        + "".join(f"<td class=num>{_esc(with_interval(m, k, ci))}</td>" for _, k, ci in SUBGROUP_COLUMNS) + "</tr>"
        for value, m in values.items())
    resampled = next(iter(values.values())).get("intervals", {})
    how = (f"{resampled.get('level', 0.95):.0%} intervals from {resampled.get('n_boot')} bootstrap replicates "
           f"resampling {'near-duplicate groups as units' if resampled.get('resampled') == 'groups' else 'images'}")
    return (f"<h2>Per {_esc(key)}</h2><p class=sub>{_esc(how)}; n/a: the subgroup lacks a class the figure needs."
            f"</p><table class=subgroups id='per-{_esc(key)}'>{head}{rows}</table>")


def _figures_html(figures: list[_Figure]) -> str:
    """The plots in a grid; a wide figure (the sample grid) opens a section of its own."""
    parts = ["<h2>Plots</h2><div class=grid>"]
    for name, caption, css in figures:
        if css == "wide":
            parts.append("</div><h2>Radiographs, worst errors first</h2><div class=grid>")
        parts.append(f"<figure class='{css}'><img src='{_esc(name)}' alt='{_esc(name)}'>"
                     f"<figcaption>{_esc(caption)}</figcaption></figure>")
    parts.append("</div>")
    return "".join(parts)


def _page_html(shown: _Shown, *, title: str, notes, summary, metrics, subgroups, figures, with_predictions: bool) -> str:
    files = "<p class=sub>Files: <a href=metrics.json>metrics.json</a>" + (
        " · <a href=predictions.csv>predictions.csv</a>" if with_predictions else "") + "</p></main></body></html>\n"
    return (_heading_html(shown, title, notes) + _tables_html(summary, metrics, subgroups) + _figures_html(figures)
            + files)


def _write_atomically(page: Path, text: str) -> Path:
    """Write ``page`` under a temporary name, then rename it: a reader never sees half a page."""
    tmp = page.with_name(f".{page.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, page)
    return page


def write_report(
    out_dir,
    *,
    y_true,
    scores,
    threshold: float | None = 0.5,
    y_pred=None,
    paths=None,
    study=None,
    classes=DEFAULT_CLASSES,
    summary: dict | None = None,
    metrics: dict | None = None,
    scoring: str | None = None,
    title: str = "fracfeat report",
    notes=(),
    n_samples: int = 24,
    sources=None,
    subgroups: dict | None = None,
    heatmaps=None,
) -> Path:
    """Write ``out_dir/index.html`` with its PNG plots, ``metrics.json`` and ``predictions.csv``.

    Parameters
    ----------
    out_dir : str or Path
        Folder for the page; created if missing. Files of an earlier report there are replaced.
    y_true : array of {0, 1}
        True labels of the evaluated images (1 = ``classes[1]``, fractured).
    scores : array of float
        Predicted probability of label 1 for each image.
    threshold : float or None
        The model's decision threshold (score >= threshold predicts label 1): the marked operating point.
        None when the model decides otherwise (then give ``y_pred``).
    y_pred : array of {0, 1}, optional
        The model's own predictions; they define the operating point when given.
    paths : sequence of str, optional
        Image files in the order of ``y_true``; adds the sample grid (worst errors first).
    study : optuna.Study, optional
        The tuning study; adds the optimization history and parameter importances.
    classes : (str, str)
        Display names of label 0 and label 1.
    summary : dict, optional
        Rows of the summary table (data, backbone, store version, classifier, parameters...); a dict
        value is shown as a list of ``key = value``.
    metrics : dict, optional
        Metric name -> value, or split name -> {metric name -> value} for one column per split.
    scoring : str, optional
        Name of the tuning score (axis label of the optimization history).
    title : str
    notes : sequence of str
        Warnings shown at the top of the page (e.g. a hold-out without groups).
    n_samples : int
        Radiographs in the sample grid.
    sources : sequence of str, optional
        The source of each image: the reliability diagram draws a curve per source when there are several.
    subgroups : dict, optional
        ``{"source": {value: metrics}, "region": {...}, "projection": {...}}`` (an :func:`fracfeat.evaluate`
        split's ``subgroups``): a table per grouping, with the intervals.
    heatmaps : ({index into paths: map}, method), optional
        Heatmaps (:func:`sample_heatmaps`) the sample grid shows beside the radiographs.

    Returns
    -------
    Path
        The ``index.html`` written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = _shown(y_true, scores, threshold, y_pred, classes)
    with_paths = paths is not None and len(paths) > 0
    t0 = time.perf_counter()
    figures = _score_figures(out, shown) + [_reliability_figure(out, shown, sources)]
    if study is not None:
        figures += _tuning_figures(out, study, scoring)
    if with_paths:
        figures.append(_sample_figure(out, shown, paths, n_samples, heatmaps))
    log.debug("report plots drawn in %.1fs", time.perf_counter() - t0)
    _write_metrics_json(out / "metrics.json", shown, metrics, summary)
    if with_paths:
        _write_predictions_csv(out / "predictions.csv", shown, paths)
    page = _page_html(shown, title=title, notes=notes, summary=summary, metrics=metrics, subgroups=subgroups,
                      figures=figures, with_predictions=with_paths)
    return _write_atomically(out / "index.html", page)


# -- a model on data -------------------------------------------------------------------------------

def decision_threshold(pipeline) -> float | None:
    """The threshold on P(fractured) a Pipeline from :func:`fit` keeps, or None when it has none."""
    last = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
    value = getattr(last, "threshold", None) if type(last).__name__ == "FixedThresholdClassifier" else None
    return float(value) if isinstance(value, (int, float, np.floating)) else None


def _changed_params(estimator) -> dict:
    """Parameters that differ from the estimator's defaults (what tuning chose)."""
    try:
        defaults = type(estimator)().get_params(deep=False)
    except TypeError:  # needs constructor arguments
        defaults = {}
    return {k: v for k, v in estimator.get_params(deep=False).items()
            if k not in defaults or repr(defaults[k]) != repr(v)}


# Wrappers fit() puts around a classifier: the decision threshold, the SVM's calibrated probabilities.
_WRAPPERS = ("FixedThresholdClassifier", "SigmoidCalibrated", "LocalCalibration")


def _unwrapped(estimator):
    """The classifier inside fit()'s wrappers (the estimator the tuned parameters belong to)."""
    while type(estimator).__name__ in _WRAPPERS:
        estimator = estimator.estimator
    return estimator


def describe_model(pipeline) -> dict:
    """Summary-table rows of a fitted Pipeline: extractor, training store version, steps, classifier."""
    deep, head = split_feature_step(pipeline)
    out = {}
    if deep is not None:
        from ._transformer import feature_parts

        cfgs = [part.config_ for part in feature_parts(deep)]
        out["backbone"] = " + ".join(f"{c.backbone}, {c.image_size} px, {c.pooling} pooling"
                                     f"{', layers ' + ' '.join(c.layers) + ' final' if c.layers else ''} "
                                     f"({c.precision}, {c.runtime})" for c in cfgs)
        identities = dict.fromkeys(c.weights for c in cfgs)
        out["weights"] = ", ".join(f"{kind} {digest[:19]}…" if len(digest) > 20 else w
                                   for w in identities for kind, _, digest in [w.partition(":")])
    steps = getattr(head, "steps", [("classifier", head)])
    out["pipeline"] = " → ".join(
        f"{name}: {est if isinstance(est, str) or est is None else type(est).__name__}"
        for name, est in ([("features", deep)] if deep is not None else []) + list(steps))
    out["classifier"] = type(_unwrapped(steps[-1][1])).__name__
    params = {}
    for name, est in steps:
        if est is None or isinstance(est, str):
            continue
        for k, v in _changed_params(_unwrapped(est)).items():
            params[k if est is steps[-1][1] else f"{name}__{k}"] = v
    out["parameters"] = params
    threshold = decision_threshold(pipeline)
    out["decision threshold"] = "the classifier's own rule" if threshold is None else f"{threshold:.4f} on P(fractured)"
    return out


def describe_fit(result) -> dict:
    """Summary-table rows of a :class:`fracfeat.FitResult`: how tuning went."""
    trials = result.trials
    rows = {
        "tuning": (f"{trials.get('complete', 0) + trials.get('pruned', 0)} Optuna trials "
                   f"({trials.get('complete', 0)} complete, {trials.get('pruned', 0)} pruned, "
                   f"{trials.get('fail', 0)} failed) over {result.cv_folds}-fold "
                   f"{'grouped ' if result.grouped else ''}CV on {result.n_train} images"),
        f"best CV {result.scoring}": result.cv_score,
        "best trial parameters": dict(result.best_params),
    }
    for split, value in result.scores.items():
        if split != "cv" and value is not None:
            rows[f"{split} {result.scoring} (after tuning)"] = value
    return rows


def trained_sources(pipeline) -> list[str]:
    """The sources the model was trained on, where its feature step says (``trained_on_["sources"]``), else []."""
    deep, _ = split_feature_step(pipeline)
    trained = getattr(deep, "trained_on_", None) or {}
    sources = trained.get("sources") or []
    return [str(s) for s in (sources.keys() if isinstance(sources, dict) else sources) if str(s)]


def _training_words(pipeline) -> str:
    """Which data the model was trained on, in plain words, from its feature step's ``trained_on_``."""
    deep, _ = split_feature_step(pipeline)
    trained = getattr(deep, "trained_on_", None) or {}
    if trained.get("version") is None:
        return "not recorded (a classifier of feature arrays, or a model fitted outside fracfeat.fit)"
    words = f"store {trained.get('store')} v{trained['version']}"
    sources = trained_sources(pipeline)
    return words + (f", images of source {', '.join(sources)}" if sources else ", source column not recorded")


def _scoring_words(sources: np.ndarray) -> str:
    """The evaluated images' sources with their counts: ``fracatlas (40), hbfmid (12)``."""
    names, counts = np.unique(np.asarray(sources).astype(str), return_counts=True)
    return ", ".join(f"{n or '(source not given)'} ({c})" for n, c in zip(names, counts))


def _provenance(pipeline, sources: np.ndarray) -> tuple[dict, list[str]]:
    """Summary rows saying what the model was trained on and what it is scored on, and a note when the scored
    images come from sources the model was not trained on (where the model records its training sources)."""
    trained = trained_sources(pipeline)
    rows = {"trained on": _training_words(pipeline), "scored on sources": _scoring_words(sources)}
    foreign = sorted({s for s in np.asarray(sources).astype(str) if s} - set(trained)) if trained else []
    notes = [f"The model was trained on images of {', '.join(trained)} and is scored here on images of "
             f"{', '.join(foreign)} too: figures on a source it was not trained on say how it transfers there, "
             f"not how it does on its own source; see the per-source table."] if foreign else []
    return rows, notes


def report(model, features_or_source, out_dir, *, version="latest", study=None, split=None, summary=None,
           title: str = "fracfeat report", notes=(), n_samples: int = 24, by=None, n_boot: int = 1000,
           heatmaps: bool = True):
    """Evaluate ``model`` on labeled data and write the HTML report page.

    Parameters
    ----------
    model : Pipeline, FitResult, or path to a joblib file
        A FitResult also brings its Optuna study and tuning summary.
    features_or_source : FeatureSet, FeatureStore, store directory, or image source
        As for :func:`fracfeat.evaluate`.
    out_dir : str or Path
        Folder of ``index.html``, its PNGs, ``metrics.json`` and ``predictions.csv``.
    version : int or "latest"
        Store version, when the data is a store.
    study : optuna.Study, optional
        Adds the optimization history and parameter importances.
    split : str, optional
        The split the plots show; by default "test", else "val", else every image. The metrics table
        always has a column per split.
    summary : dict, optional
        Extra rows for the summary table.
    title : str
    notes : sequence of str
        Warnings shown at the top of the page.
    n_samples : int
        Radiographs in the sample grid.
    by, n_boot
        As for :func:`fracfeat.evaluate`: the groupings of the per-source, per-region and per-projection
        tables, and the bootstrap replicates of their intervals.
    heatmaps : bool
        Show each radiograph of the sample grid beside its heatmap (:func:`fracfeat.explain`; occlusion,
        the fallback, costs 49 forward passes an image). Left out when the maps cannot be made.

    Returns
    -------
    (Path, dict)
        The page written, and :func:`fracfeat.evaluate`'s ``{split: metrics}``.

    Examples
    --------
    >>> from fracfeat import report
    >>> page, metrics = report("model.joblib", "data/test_folder", "report/")   # doctest: +SKIP
    """
    fit_result = model if hasattr(model, "pipeline") and hasattr(model, "study") else None
    pipeline = pipeline_of(model)
    if study is None and fit_result is not None:
        study = fit_result.study
    rows = predict_rows(pipeline, features_or_source, version=version)
    metrics = checked_metrics(rows, by=by, n_boot=n_boot)
    if split is None:
        split = next((s for s in ("test", "val", "held-out") if s in metrics), next(iter(metrics)))
    if split not in metrics:
        raise ConfigError(f"split={split!r}: the data has {list(metrics)}")
    mask = np.ones(len(rows.y), bool) if split == "all" else rows.splits == split
    shown = metrics[split]
    data = features_or_source
    if isinstance(data, FeatureSet):
        data = f"rows of store {data.store} v{data.version_label}" if data.version_label else "a feature set"
    elif isinstance(data, Mapping):
        data = "sources " + ", ".join(str(name) for name in data)
    elif not isinstance(data, (str, os.PathLike)):
        data = f"{len(data)} images"
    evaluated = (f"{data}: {'every image' if split == 'all' else f'split {split!r}'}, {shown['n']} images "
                 f"({shown['n_positive']} {rows.classes[1]}), {shown['n_failed']} unreadable")
    # Data first, then the model, then how it was tuned; the caller's rows win.
    words, foreign = _provenance(pipeline, rows.column("source")[mask])
    table = {**(summary or {}), "evaluated on": evaluated, **words, **describe_model(pipeline),
             **(describe_fit(fit_result) if fit_result is not None else {}), **(summary or {})}
    page = write_report(
        out_dir, y_true=rows.y[mask], scores=rows.score[mask], y_pred=rows.pred[mask],
        threshold=decision_threshold(pipeline), paths=rows.paths[mask], study=study, classes=rows.classes,
        summary=table, metrics=metrics, scoring=getattr(fit_result, "scoring", None), title=title,
        notes=[*getattr(fit_result, "alarms", ()), *ranking_alarms(metrics), *shift_alarms(metrics), *foreign, *notes],
        n_samples=n_samples, sources=rows.column("source")[mask], subgroups=shown.get("subgroups"),
        heatmaps=sample_heatmaps(pipeline, rows.paths[mask], rows.y[mask], rows.score[mask], n_samples)
        if heatmaps and len(rows.paths[mask]) else None,
    )
    return page, metrics
