"""The report's plots, and the operating point they mark.

Every plot is a function of plain inputs (true labels, scores, the decision threshold, image paths,
an Optuna study) returning a :class:`matplotlib.figure.Figure`, so each can be used on its own;
:func:`fracfeat._report.write_report` puts them on one page.

matplotlib is imported inside the functions (``import fracfeat`` stays cheap), and figures are drawn
on the Agg canvas directly, never through pyplot, so no GUI backend or global figure state is touched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ._deps import require
from ._explain import overlay, resized_map
from ._featureset import DEFAULT_CLASSES
from ._images import load_image
from ._metrics import expected_calibration_error, reliability_curve

log = logging.getLogger("fracfeat")

# Colours of label 0 (not fractured) and label 1 (fractured), and of right / wrong predictions.
CLASS_COLORS = ("#4c72b0", "#dd8452")
RIGHT, WRONG = "#2a9d4b", "#c0392b"
DPI = 110


def _figure(width: float, height: float):
    require("matplotlib", why="report plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def labels_and_scores(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` as int labels and ``scores`` as floats, flat; refused when their lengths differ."""
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {len(y)} entries but scores has {len(s)}; give one score per label")
    return y, s


def format_value(value, digits: int = 3) -> str:
    """A metric as a table or legend shows it: ``digits`` decimals, "n/a" for NaN."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def predicted_positive(s: np.ndarray, threshold, y_pred) -> np.ndarray:
    """The model's decisions as booleans (label 1): ``y_pred`` when given, else ``s >= threshold``."""
    if y_pred is not None:
        pred = np.asarray(y_pred).astype(int).ravel()
        if pred.shape != s.shape:
            raise ValueError(f"y_pred has {len(pred)} entries but scores has {len(s)}; give one per label")
        return pred == 1
    return s >= (0.5 if threshold is None else threshold)


def rule_label(threshold) -> str:
    """How the operating point was chosen, for labels."""
    return "model's decision" if threshold is None else f"threshold {threshold:.2f}"


def operating_point(y_true, scores, threshold: float | None = 0.5, y_pred=None) -> dict:
    """Sensitivity, specificity, precision and the confusion counts of the model's decisions.

    The decisions are ``y_pred`` when given (a model's own ``predict``, e.g. an SVC whose decision
    function and probabilities can disagree near 0.5), else ``score >= threshold``.
    """
    y, s = labels_and_scores(y_true, scores)
    pred = predicted_positive(s, threshold, y_pred)
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
    y, s = labels_and_scores(y_true, scores)
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
    ax.set_title(f"Confusion matrix ({rule_label(threshold)})")
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

    y, s = labels_and_scores(y_true, scores)
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="#999", lw=1, label="chance")
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=CLASS_COLORS[1], lw=2, label=f"ROC (AUC {roc_auc_score(y, s):.3f})")
    op = operating_point(y, s, threshold, y_pred)
    ax.plot(op["fpr"], op["sensitivity"], "o", ms=9, mfc="white", mec="black", mew=2,
            label=f"{rule_label(threshold)}: sens. {format_value(op['sensitivity'], 2)}, spec. {format_value(op['specificity'], 2)}")
    _unit_square(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)", "ROC curve",
                 legend="lower right")
    ax.set_aspect("equal")
    return fig


def plot_precision_recall(y_true, scores, threshold: float | None = 0.5, y_pred=None):
    """Precision-recall curve with average precision, the base rate, and the operating point marked."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, s = labels_and_scores(y_true, scores)
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
                label=f"{rule_label(threshold)}: recall {format_value(op['sensitivity'], 2)}, precision {format_value(op['precision'], 2)}")
    _unit_square(ax, "recall (sensitivity)", "precision", "Precision-recall curve", legend="lower left")
    return fig


def plot_score_distribution(y_true, scores, threshold: float | None = 0.5, classes=DEFAULT_CLASSES):
    """Histogram of the predicted probability of each true class, with the threshold line."""
    y, s = labels_and_scores(y_true, scores)
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


# Colours of the per-source reliability curves (the curve of every image is black).
SOURCE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def plot_reliability(y_true, scores, sources=None, n_bins: int = 10):
    """Reliability diagram: each bin's mean P(fractured) against its observed fractured share, the diagonal
    of perfect calibration, and the images per bin (printed at the points, drawn as bars below).

    Bins are :func:`fracfeat._metrics.reliability_curve`'s ``n_bins`` equal-width bins. With ``sources``
    (one name per image) naming several sources, each gets its own curve beside that of every image.
    """
    y, s = labels_and_scores(y_true, scores)
    fig = _figure(4.8, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.plot([0, 1], [0, 1], ls="--", color="#999", lw=1, label="perfectly calibrated")
    if not len(y):
        _unit_square(top, "", "observed fractured share", "Reliability (no images)", legend="upper left")
        return fig
    curve = reliability_curve(y, s, n_bins)
    names = sorted({str(v) for v in sources} - {""}) if sources is not None else []
    if len(names) > 1:
        column = np.asarray(sources).astype(str)
        for k, name in enumerate(names):
            part = reliability_curve(y[column == name], s[column == name], n_bins)
            top.plot(part["mean_predicted"], part["observed_rate"], "o-", ms=4, lw=1.2,
                     color=SOURCE_COLORS[k % len(SOURCE_COLORS)], label=f"{name} (n={int(part['count'].sum())})")
    top.plot(curve["mean_predicted"], curve["observed_rate"], "s-", ms=5, lw=2, color="black",
             label=f"every image (n={len(y)})")
    for x, r, c in zip(curve["mean_predicted"], curve["observed_rate"], curve["count"]):
        top.annotate(str(int(c)), (x, r), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    _unit_square(top, "", "observed fractured share", f"Reliability: ECE {expected_calibration_error(y, s, n_bins):.3f}, "
                 f"Brier {float(np.mean((s - y) ** 2)):.3f}", legend="upper left")
    bottom.bar((curve["bin_low"] + curve["bin_high"]) / 2, curve["count"], width=0.9 / n_bins, color=CLASS_COLORS[0])
    bottom.set_xlabel(f"mean predicted probability in the bin ({n_bins} equal-width bins)")
    bottom.set_ylabel("images")
    bottom.grid(alpha=0.3)
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

    from ._fit import quiet_optuna  # here, not at the top: _fit -> _validation -> _report -> _plots is a cycle

    complete = _trials(study, (optuna.trial.TrialState.COMPLETE,))
    scope = "all completed trials"
    if len({str(t.params.get("classifier")) for t in complete}) > 1:
        best = study.best_trial.params.get("classifier")
        family = [t for t in complete if t.params.get("classifier") == best]
        if len(family) >= 2:
            with quiet_optuna():  # no "A new study created in memory" line in the user's terminal
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
    y, s = labels_and_scores(y_true, scores)
    return np.argsort(-np.abs(y - s), kind="stable")


def plot_sample_grid(paths, y_true, scores, threshold: float | None = 0.5, classes=DEFAULT_CLASSES, n: int = 24,
                     columns: int = 6, thumb_size: int = 192, y_pred=None, heatmaps=None):
    """Radiographs with true label and predicted probability, worst errors first.

    Each tile is titled with the true class and the probability of ``classes[1]``, in red when the
    prediction at ``threshold`` is wrong. Images go through fracfeat's own decoder (EXIF orientation,
    truncated files read as far as they go), squashed to a square as the backbone sees them.
    ``heatmaps`` (``{index into paths: map}``, from :func:`fracfeat.explain`) puts each radiograph beside
    its heatmap overlay (two columns an image); an image without a map gets "no heatmap" there.
    """
    y, s = labels_and_scores(y_true, scores)
    if len(paths) != len(y):
        raise ValueError(f"{len(paths)} paths but {len(y)} labels; give one path per label")
    pred = predicted_positive(s, threshold, y_pred)
    order = worst_first(y, s)[:n]
    step = 2 if heatmaps is not None else 1
    rows = max(1, math.ceil(len(order) * step / columns))
    fig = _figure(columns * 1.9, rows * 2.2)
    for k, i in enumerate(order):
        ax = fig.add_subplot(rows, columns, k * step + 1)
        decoded = load_image(str(paths[i]), thumb_size)
        if heatmaps is not None:
            _heatmap_tile(fig.add_subplot(rows, columns, k * step + 2), decoded.pixels, heatmaps.get(int(i)))
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


def _heatmap_tile(ax, pixels, heat) -> None:
    """The radiograph's thumbnail with its heatmap on top (where the model looked), or why there is none."""
    if pixels is not None and heat is not None:
        side = pixels.shape[0]
        ax.imshow(overlay(pixels, resized_map(heat, side, side)))
        ax.set_title("heatmap: red pushed p up", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no heatmap", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as the PNG the report page shows."""
    fig.savefig(path, dpi=DPI)
