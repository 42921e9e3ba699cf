"""Plots and the HTML report page.

Every plot is a function of plain inputs (true labels, scores, the decision threshold, image paths,
an Optuna study) returning a :class:`matplotlib.figure.Figure`, so each can be used on its own.
:func:`write_report` puts them on one self-contained page: ``DIR/index.html`` next to its PNGs, plus
``metrics.json`` and ``predictions.csv`` for scripts.

matplotlib is imported inside the functions (``import fracfeat`` stays cheap), and figures are drawn
on the Agg canvas directly, never through pyplot, so no GUI backend or global figure state is touched.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from ._featureset import DEFAULT_CLASSES, FeatureSet

log = logging.getLogger("fracfeat")

# Colours of label 0 (not fractured) and label 1 (fractured), and of right / wrong predictions.
CLASS_COLORS = ("#4c72b0", "#dd8452")
RIGHT, WRONG = "#2a9d4b", "#c0392b"
DPI = 110


def _figure(width: float, height: float):
    from ._deps import require

    require("matplotlib", why="report plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _binary(y_true, scores):
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {len(y)} entries but scores has {len(s)}; give one score per label")
    return y, s


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _decisions(s: np.ndarray, threshold, y_pred) -> np.ndarray:
    if y_pred is not None:
        pred = np.asarray(y_pred).astype(int).ravel()
        if pred.shape != s.shape:
            raise ValueError(f"y_pred has {len(pred)} entries but scores has {len(s)}; give one per label")
        return pred == 1
    return s >= (0.5 if threshold is None else threshold)


def _rule(threshold) -> str:
    """How the operating point was chosen, for labels."""
    return "model's decision" if threshold is None else f"threshold {threshold:.2f}"


def operating_point(y_true, scores, threshold: float | None = 0.5, y_pred=None) -> dict:
    """Sensitivity, specificity, precision and the confusion counts of the model's decisions.

    The decisions are ``y_pred`` when given (a model's own ``predict``, e.g. an SVC whose decision
    function and probabilities can disagree near 0.5), else ``score >= threshold``.
    """
    y, s = _binary(y_true, scores)
    pred = _decisions(s, threshold, y_pred)
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    return {
        "threshold": None if threshold is None else float(threshold), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "fpr": fp / (fp + tn) if fp + tn else float("nan"),
    }


# -- plots ----------------------------------------------------------------------------------------

def plot_confusion_matrix(y_true, scores, threshold: float | None = 0.5, classes=DEFAULT_CLASSES, y_pred=None):
    """Counts and row percentages of true class (rows) against predicted class (columns)."""
    y, s = _binary(y_true, scores)
    op = operating_point(y, s, threshold, y_pred)
    cm = np.array([[op["tn"], op["fp"]], [op["fn"], op["tp"]]])
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    row_sums = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, row_sums, out=np.zeros(cm.shape, float), where=row_sums > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=13,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks([0, 1], [f"pred. {c}" for c in classes])
    ax.set_yticks([0, 1], [f"true {c}" for c in classes], rotation=90, va="center")
    ax.set_title(f"Confusion matrix ({_rule(threshold)})")
    return fig


def _unit_square(ax, xlabel: str, ylabel: str, title: str, legend: str) -> None:
    """Axes of a curve whose both coordinates are rates in [0, 1]."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)
    ax.set_title(title)


def plot_roc(y_true, scores, threshold: float | None = 0.5, y_pred=None):
    """ROC curve with its AUC and the operating point at ``threshold`` marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = _binary(y_true, scores)
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=1, label="chance")
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=CLASS_COLORS[1], lw=2, label=f"ROC (AUC {roc_auc_score(y, s):.3f})")
    op = operating_point(y, s, threshold, y_pred)
    ax.plot(op["fpr"], op["sensitivity"], "o", ms=9, mfc="white", mec="black", mew=2,
            label=f"{_rule(threshold)}: sens. {_fmt(op['sensitivity'], 2)}, spec. {_fmt(op['specificity'], 2)}")
    _unit_square(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)", "ROC curve",
                 legend="lower right")
    ax.set_aspect("equal")
    return fig


def plot_precision_recall(y_true, scores, threshold: float | None = 0.5, y_pred=None):
    """Precision-recall curve with average precision, the base rate, and the operating point marked."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, s = _binary(y_true, scores)
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    base = float(np.mean(y == 1)) if len(y) else 0.0
    ax.axhline(base, ls="--", color="#999", lw=1, label=f"base rate {base:.2f}")
    if (y == 1).any():
        precision, recall, _ = precision_recall_curve(y, s)
        ax.plot(recall, precision, color=CLASS_COLORS[1], lw=2,
                label=f"PR (AP {average_precision_score(y, s):.3f})")
    op = operating_point(y, s, threshold, y_pred)
    if not math.isnan(op["precision"]):
        ax.plot(op["sensitivity"], op["precision"], "o", ms=9, mfc="white", mec="black", mew=2,
                label=f"{_rule(threshold)}: recall {_fmt(op['sensitivity'], 2)}, precision {_fmt(op['precision'], 2)}")
    _unit_square(ax, "recall (sensitivity)", "precision", "Precision-recall curve", legend="lower left")
    return fig


def plot_score_distribution(y_true, scores, threshold: float | None = 0.5, classes=DEFAULT_CLASSES):
    """Histogram of the predicted probability of each true class, with the threshold line."""
    y, s = _binary(y_true, scores)
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 31)
    for label in (0, 1):
        part = s[y == label]
        if len(part):
            # Density per class: the minority class would be invisible in raw counts.
            ax.hist(part, bins=bins, alpha=0.55, color=CLASS_COLORS[label], density=True,
                    label=f"true {classes[label]} (n={len(part)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.2f}")
    ax.set_xlabel(f"predicted probability of {classes[1]}")
    ax.set_ylabel("density")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Score distribution per class")
    return fig


def _trials(study, states):
    return [t for t in study.get_trials(deepcopy=False) if t.state in states]


def plot_optimization_history(study, scoring: str | None = None):
    """Each finished trial's score, the best score so far, and pruned trials at their last report."""
    import optuna

    TS = optuna.trial.TrialState
    complete = _trials(study, (TS.COMPLETE,))
    pruned = [t for t in _trials(study, (TS.PRUNED,)) if t.intermediate_values]
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    name = scoring or "objective"
    if not complete:
        ax.text(0.5, 0.5, "no completed trial", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    family_key = "classifier" if any("classifier" in t.params for t in complete) else None
    if family_key:
        families = sorted({str(t.params.get(family_key)) for t in complete})
        palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
        for k, fam in enumerate(families):
            ts = [t for t in complete if str(t.params.get(family_key)) == fam]
            ax.scatter([t.number for t in ts], [t.value for t in ts], s=22, color=palette[k % len(palette)],
                       label=fam, zorder=3)
    else:
        ax.scatter([t.number for t in complete], [t.value for t in complete], s=22, color=CLASS_COLORS[0],
                   label="trial", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   marker="x", s=20, color="#999", label=f"pruned ({len(pruned)})", zorder=2)
    order = sorted(complete, key=lambda t: t.number)
    best, xs, ys = None, [], []
    for t in order:
        if best is None or (t.value > best if maximize else t.value < best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", lw=1.5, label=f"best so far ({best:.4f})")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"CV {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if maximize else "upper right")
    ax.set_title(f"Optimization history ({len(complete)} completed, {len(pruned)} pruned)")
    return fig


def param_importances(study) -> tuple[dict, str]:
    """fANOVA importance of each parameter (seeded), and which trials it covers.

    When the study searched several classifier families (fit's "auto"), fANOVA can only weigh the
    parameters every trial has (the family itself), so the importances are computed over the best
    family's trials instead. Returns ``({}, reason)`` when the trials cannot support an estimate.
    """
    import optuna

    complete = _trials(study, (optuna.trial.TrialState.COMPLETE,))
    scope = "all completed trials"
    if len({str(t.params.get("classifier")) for t in complete}) > 1:
        best = study.best_trial.params.get("classifier")
        family = [t for t in complete if t.params.get("classifier") == best]
        if len(family) >= 2:
            from ._fit import _quiet_optuna

            with _quiet_optuna():  # no "A new study created in memory" line in the user's terminal
                sub = optuna.create_study(direction=study.direction)
            sub.add_trials(family)
            study, complete, scope = sub, family, f"the {len(family)} {best} trials (best family)"
    if len(complete) < 2:
        return {}, "needs at least 2 completed trials"
    shared = set.intersection(*(set(t.params) for t in complete))
    varying = sorted(k for k in shared if len({repr(t.params[k]) for t in complete}) > 1)
    if not varying:
        return {}, "the trials' parameters do not vary"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)), scope
    except (RuntimeError, ValueError) as e:  # e.g. every trial had the same parameters
        log.debug("parameter importances unavailable: %s", e)
        return {}, "the trials' parameters do not vary enough"


def plot_param_importances(study):
    """Horizontal bars of each hyperparameter's share of the score's variance (fANOVA)."""
    importances, scope = param_importances(study)
    fig = _figure(6.0, max(2.2, 0.45 * len(importances) + 1.2))
    ax = fig.add_subplot()
    if not importances:
        ax.text(0.5, 0.5, f"no importances: {scope}", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    ax.barh(names, values, color=CLASS_COLORS[0])
    for k, v in enumerate(values):
        ax.text(v, k, f" {v:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, max(values) * 1.18 or 1)
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(f"Hyperparameter importances\nover {scope}", fontsize=10)
    return fig


def worst_first(y_true, scores) -> np.ndarray:
    """Indices ordered by how wrong the score is (|label - probability|), worst first; stable on ties."""
    y, s = _binary(y_true, scores)
    return np.argsort(-np.abs(y - s), kind="stable")


def plot_sample_grid(paths, y_true, scores, threshold: float | None = 0.5, classes=DEFAULT_CLASSES, n: int = 24,
                     columns: int = 6, thumb_size: int = 192, y_pred=None):
    """Radiographs with true label and predicted probability, worst errors first.

    Each tile is titled with the true class and the probability of ``classes[1]``, in red when the
    prediction at ``threshold`` is wrong. Images go through fracfeat's own decoder (EXIF orientation,
    truncated files read as far as they go), squashed to a square as the backbone sees them.
    """
    from ._images import load_image

    y, s = _binary(y_true, scores)
    if len(paths) != len(y):
        raise ValueError(f"{len(paths)} paths but {len(y)} labels; give one path per label")
    pred = _decisions(s, threshold, y_pred)
    order = worst_first(y, s)[:n]
    rows = max(1, math.ceil(len(order) / columns))
    fig = _figure(columns * 1.9, rows * 2.2)
    for k, i in enumerate(order):
        ax = fig.add_subplot(rows, columns, k + 1)
        decoded = load_image(str(paths[i]), thumb_size)
        if decoded.pixels is not None:
            ax.imshow(decoded.pixels)
        else:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        wrong = pred[i] != (y[i] == 1)
        color = WRONG if wrong else RIGHT
        ax.set_title(f"{'✗' if wrong else '✓'} true {classes[y[i]]}\np={s[i]:.2f} · {Path(str(paths[i])).name}",
                     fontsize=7.5, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2.5 if wrong else 1)
    if not len(order):
        fig.add_subplot().set_axis_off()
    return fig


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
    ("specificity", "specificity"), ("pr_auc", "PR AUC"), ("f1", "F1"),
)


def _esc(value) -> str:
    return html.escape(str(value))


def _value_html(value) -> str:
    if isinstance(value, dict):
        if not value:
            return "<i>none</i>"
        return "<ul class=kv>" + "".join(f"<li><code>{_esc(k)}</code> = {_esc(_fmt(v, 4))}</li>"
                                         for k, v in value.items()) + "</ul>"
    if isinstance(value, (list, tuple)):
        return _esc(", ".join(str(v) for v in value))
    return _esc(_fmt(value, 4))


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
        f"<tr><td>{_esc(n)}</td>" + "".join(f"<td class=num>{_esc(_fmt(columns[c].get(n, float('nan'))))}</td>"
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


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


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

    Returns
    -------
    Path
        The ``index.html`` written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y, s = _binary(y_true, scores)
    classes = tuple(classes)
    op = operating_point(y, s, threshold, y_pred)
    pred = _decisions(s, threshold, y_pred).astype(int)
    rule = _rule(threshold)
    figures: list[tuple[str, str, str]] = []  # (file, caption, css class)

    def add(name, fig, caption, css=""):
        _save(fig, out / name)
        figures.append((name, caption, css))

    t0 = time.perf_counter()
    add("confusion_matrix.png", plot_confusion_matrix(y, s, threshold, classes, pred),
        f"Rows: true class; columns: predicted class ({rule}). Percentages are per row "
        f"(sensitivity is the bottom-right share, specificity the top-left).")
    add("score_distribution.png", plot_score_distribution(y, s, threshold, classes),
        "How far apart the model pushes the two classes; the dashed line is the decision threshold.")
    add("roc.png", plot_roc(y, s, threshold, pred),
        "Every threshold's trade-off; the circle is the model's operating point.")
    add("precision_recall.png", plot_precision_recall(y, s, threshold, pred),
        "Precision-recall is the honest curve for a minority class; the dashed line is what guessing achieves.")
    if study is not None:
        add("optimization_history.png", plot_optimization_history(study, scoring),
            "Cross-validated score of each Optuna trial (colour: classifier family when several were searched); "
            "the line is the best so far. Grey crosses: pruned trials, at their running mean over the folds "
            "done when they were stopped.")
        add("param_importances.png", plot_param_importances(study),
            "Which hyperparameters moved the cross-validated score (fANOVA over completed trials).")
    n_wrong = op["fp"] + op["fn"]
    if paths is not None and len(paths):
        add("samples.png", plot_sample_grid(paths, y, s, threshold, classes, n=n_samples, y_pred=pred),
            f"Worst errors first: {n_wrong} of {len(y)} images are misclassified ({rule}). Red: wrong, green: right; p is the predicted probability of {classes[1]}.", "wide")
    log.debug("report plots drawn in %.1fs", time.perf_counter() - t0)

    metric_columns = _scalar_metrics(metrics or {})
    with open(out / "metrics.json", "w") as f:
        json.dump({"threshold": threshold, "operating_point": op, "metrics": metrics or {}, "summary": summary or {}},
                  f, indent=2, default=_json_default)
    if paths is not None and len(paths):
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "true_label", "probability", "predicted_label", "correct"])
            for p, yi, si, pi in zip(paths, y, s, pred):
                w.writerow([p, classes[yi], f"{si:.6f}", classes[pi], int(pi == yi)])

    from ._metrics import binary_metrics

    card_values = binary_metrics(y, pred, s, classes)  # the plotted rows' own numbers
    cards = "".join(f"<div class=card><b>{_esc(_fmt(card_values[k]))}</b><span>{_esc(label)}</span></div>"
                    for k, label in _CARD_METRICS if card_values.get(k) is not None)
    n_pos = int(np.sum(y == 1))
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        f"<p class=sub>{len(y)} evaluated images ({n_pos} {_esc(classes[1])}, {len(y) - n_pos} {_esc(classes[0])}) · "
        f"{_esc(rule)} · written {_esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
        "".join(f"<div class=note>{_esc(n)}</div>" for n in notes),
        f"<div class=cards>{cards}</div>",
        "<h2>Summary</h2><table>",
        "".join(f"<tr><th>{_esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in (summary or {}).items()),
        "</table>",
    ]
    if metric_columns:
        parts += ["<h2>Metrics</h2>", _metrics_table(metric_columns)]
    parts.append("<h2>Plots</h2><div class=grid>")
    for name, caption, css in figures:
        if css == "wide":
            parts.append("</div><h2>Radiographs, worst errors first</h2><div class=grid>")
        parts.append(f"<figure class='{css}'><img src='{_esc(name)}' alt='{_esc(name)}'>"
                     f"<figcaption>{_esc(caption)}</figcaption></figure>")
    parts.append("</div><p class=sub>Files: <a href=metrics.json>metrics.json</a>"
                 + (" · <a href=predictions.csv>predictions.csv</a>" if paths is not None and len(paths) else "")
                 + "</p></main></body></html>\n")
    page = out / "index.html"
    tmp = out / f".index.html.{os.getpid()}.tmp"
    tmp.write_text("".join(parts), encoding="utf-8")
    os.replace(tmp, page)
    return page


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
_WRAPPERS = ("FixedThresholdClassifier", "SigmoidCalibrated")


def _unwrapped(estimator):
    """The classifier inside fit()'s wrappers (the estimator the tuned parameters belong to)."""
    while type(estimator).__name__ in _WRAPPERS:
        estimator = estimator.estimator
    return estimator


def describe_model(pipeline) -> dict:
    """Summary-table rows of a fitted Pipeline: extractor, training store version, steps, classifier."""
    from ._metrics import _split_feature_step

    deep, head = _split_feature_step(pipeline)
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
        trained = getattr(deep, "trained_on_", None) or {}
        if trained.get("version") is not None:
            out["trained on store version"] = f"{trained.get('store')} v{trained['version']}"
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


def report(model, features_or_source, out_dir, *, version="latest", study=None, split=None, summary=None,
           title: str = "fracfeat report", notes=(), n_samples: int = 24):
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

    Returns
    -------
    (Path, dict)
        The page written, and :func:`fracfeat.evaluate`'s ``{split: metrics}``.

    Examples
    --------
    >>> from fracfeat import report
    >>> page, metrics = report("model.joblib", "data/test_folder", "report/")   # doctest: +SKIP
    """
    from ._errors import ConfigError
    from ._metrics import _pipeline_of, checked_metrics, predict_rows, ranking_alarms

    fit_result = model if hasattr(model, "pipeline") and hasattr(model, "study") else None
    pipeline = _pipeline_of(model)
    if study is None and fit_result is not None:
        study = fit_result.study
    rows = predict_rows(pipeline, features_or_source, version=version)
    metrics = checked_metrics(rows)
    if split is None:
        split = next((s for s in ("test", "val", "held-out") if s in metrics), next(iter(metrics)))
    if split not in metrics:
        raise ConfigError(f"split={split!r}: the data has {list(metrics)}")
    mask = np.ones(len(rows.y), bool) if split == "all" else rows.splits == split
    shown = metrics[split]
    data = features_or_source
    if isinstance(data, FeatureSet):
        data = f"rows of store {data.store} v{data.version_label}" if data.version_label else "a feature set"
    elif not isinstance(data, (str, os.PathLike)):
        data = f"{len(data)} images"
    evaluated = (f"{data}: {'every image' if split == 'all' else f'split {split!r}'}, {shown['n']} images "
                 f"({shown['n_positive']} {rows.classes[1]}), {shown['n_failed']} unreadable")
    # Data first, then the model, then how it was tuned; the caller's rows win.
    table = {**(summary or {}), "evaluated on": evaluated, **describe_model(pipeline),
             **(describe_fit(fit_result) if fit_result is not None else {}), **(summary or {})}
    if "store version" in table:
        table.pop("trained on store version", None)
    page = write_report(
        out_dir, y_true=rows.y[mask], scores=rows.score[mask], y_pred=rows.pred[mask],
        threshold=decision_threshold(pipeline), paths=rows.paths[mask], study=study, classes=rows.classes,
        summary=table, metrics=metrics, scoring=getattr(fit_result, "scoring", None), title=title,
        notes=[*getattr(fit_result, "alarms", ()), *ranking_alarms(metrics), *notes],
        n_samples=n_samples,
    )
    return page, metrics
