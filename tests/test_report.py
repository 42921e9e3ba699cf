"""The HTML report and its plots, from plain inputs (labels, scores, paths, a real Optuna study)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from fracfeat._plots import operating_point, param_importances, worst_first
from fracfeat._report import report, write_report
from test_metrics import HBFMID, two_source_manifest


def small_study(n_trials=8):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))

    def objective(trial):
        c = trial.suggest_float("C", 1e-3, 1e3, log=True)
        family = trial.suggest_categorical("classifier", ["logreg", "svm"])
        trial.report(0.5, 0)
        if trial.number == 3:
            raise optuna.TrialPruned()
        return 0.9 - 0.02 * abs(np.log10(c)) + (0.01 if family == "svm" else 0.0)

    study.optimize(objective, n_trials=n_trials)
    return study


def test_operating_point_matches_sklearn():
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.random(200)
    op = operating_point(y, s, 0.3)
    tn, fp, fn, tp = confusion_matrix(y, (s >= 0.3).astype(int)).ravel()
    assert (op["tn"], op["fp"], op["fn"], op["tp"]) == (tn, fp, fn, tp)
    assert op["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert op["specificity"] == pytest.approx(tn / (tn + fp))


def test_worst_errors_come_first():
    y = np.array([1, 0, 1, 0, 1])
    s = np.array([0.9, 0.8, 0.05, 0.05, 0.6])
    assert worst_first(y, s).tolist() == [2, 1, 4, 0, 3]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one score per label"):
        operating_point([0, 1, 1], [0.2, 0.5], 0.5)


def test_importances_need_two_trials():
    study = small_study(n_trials=1)
    assert param_importances(study)[0] == {}


def test_importances_of_a_multi_family_study_cover_the_best_family():
    study = small_study(n_trials=12)
    importances, scope = param_importances(study)
    assert "svm trials" in scope and set(importances) == {"C"}


@pytest.mark.slow
def test_report_page(tmp_path, real_images):
    paths = [str(p) for p in real_images["fractured"] + real_images["not_fractured"]]
    y = np.array([1] * len(real_images["fractured"]) + [0] * len(real_images["not_fractured"]))
    s = np.clip(0.25 + 0.4 * y + np.linspace(-0.2, 0.2, len(y)), 0, 1)
    study = small_study()
    page = write_report(
        tmp_path / "report", y_true=y, scores=s, threshold=0.5, paths=paths, study=study,
        classes=("not_fractured", "fractured"), scoring="roc_auc", n_samples=6,
        summary={"backbone": "vgg16", "parameters": {"C": 0.1}},
        metrics={"val": {"roc_auc": 0.9, "balanced_accuracy": 0.8}, "test": {"roc_auc": 0.85}},
        notes=["a <b>note</b>"],
    )
    text = page.read_text()
    images = re.findall(r"<img src='([^']+)'", text)
    assert set(images) == {"confusion_matrix.png", "score_distribution.png", "roc.png", "precision_recall.png",
                           "reliability.png", "optimization_history.png", "param_importances.png", "samples.png"}
    for name in images:
        with Image.open(page.parent / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    assert "&lt;b&gt;note&lt;/b&gt;" in text  # user text is escaped
    assert "<th>val</th><th>test</th>" in text and "0.900" in text
    saved = json.loads((page.parent / "metrics.json").read_text())
    assert saved["operating_point"]["tp"] == int(np.sum((s >= 0.5) & (y == 1)))
    rows = (page.parent / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,true_label,probability,predicted_label,correct" and len(rows) == len(y) + 1


def test_report_without_study_or_paths(tmp_path):
    page = write_report(tmp_path, y_true=[0, 1, 0, 1], scores=[0.1, 0.9, 0.6, 0.4])
    text = page.read_text()
    assert "optimization_history.png" not in text and "samples.png" not in text
    assert not (tmp_path / "predictions.csv").exists()


class _Tables(HTMLParser):
    """The page's tables by id: each a list of rows, each a list of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables, self._rows, self._cell = {}, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id"):
            self._rows = self.tables.setdefault(dict(attrs)["id"], [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_report_of_two_real_sources_has_subgroup_tables_and_the_reliability_figure(tmp_path, tiny_features, fracatlas):
    from fracfeat import fit

    if not (HBFMID / "manifest.csv").is_file():
        pytest.skip(f"HBFMID radiographs not found at {HBFMID}")
    manifest = two_source_manifest(tmp_path, fracatlas)
    fitted = fit(tiny_features, n_trials=1, cv=3, progress=False)
    page, metrics = report(fitted, manifest, tmp_path / "report", n_samples=4, n_boot=200)
    text = page.read_text()
    tables = _Tables()
    tables.feed(text)
    per_source, per_region = tables.tables["per-source"], tables.tables["per-region"]
    assert per_source[0] == ["source", "n", "positives", "ROC AUC [95% CI]", "sensitivity [95% CI]",
                             "specificity [95% CI]", "Brier", "outside training"]
    assert [row[:3] for row in per_source[1:]] == [["fracatlas", "16", "8"], ["hbfmid", "9", "6"]]
    shown = metrics["all"]["subgroups"]["source"]["hbfmid"]
    low, high = shown["intervals"]["roc_auc"]["low"], shown["intervals"]["roc_auc"]["high"]
    assert per_source[2][3] == f"{shown['roc_auc']:.3f} [{low:.3f}, {high:.3f}]"
    assert per_source[2][6] == f"{shown['brier']:.3f}"
    assert {row[0] for row in per_region[1:]} == {"(not given)", "hand", "hip", "leg"}
    hip = next(row for row in per_region if row[0] == "hip")
    assert hip[1:4] == ["2", "2", "n/a"]  # fractured only: no ROC AUC, the counts shown
    assert sum(int(row[1]) for row in per_region[1:]) == 25
    # The reliability figure, a real PNG, and the calibration figures in words.
    assert "<img src='reliability.png'" in text and "on the dashed diagonal the probabilities are calibrated" in text
    with Image.open(page.parent / "reliability.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
    assert "Brier score</span>" in text and "calibration error (ECE)</span>" in text
    # What the model was trained on, and what it is scored on, in plain words.
    assert re.search(r"<th>trained on</th><td>store [^<]+ v1, ", text)
    assert "<th>scored on sources</th><td>fracatlas (16), hbfmid (9)</td>" in text
    saved = json.loads((page.parent / "metrics.json").read_text())
    assert sum(saved["metrics"]["all"]["reliability"]["count"]) == 25
