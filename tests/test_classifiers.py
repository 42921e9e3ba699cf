"""Search spaces: every trial they propose must be one the classifier can finish in reasonable time."""

from __future__ import annotations

import optuna

from fracfeat._classifiers import FAMILIES, SearchContext, suggest_steps


def _proposals(classifier: str, n: int = 40) -> list:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        family, steps = suggest_steps(trial, classifier, SearchContext())
        out.append((family, dict(steps)["classifier"]))
        study.tell(trial, 0.5)
    return out


def test_svm_proposes_only_the_rbf_kernel():
    # libsvm's linear kernel on 2,600 standardized VGG16 rows ran past 200,000 iterations in one fold
    # (an RBF fit of the same rows: 2,142 iterations, 2 s), and `fracfeat run` sat 8 minutes on its
    # first trial. Linear boundaries are the logreg family's job.
    kernels = {clf.kernel for family, clf in _proposals("svm")}
    assert kernels == {"rbf"}


def test_auto_searches_every_family():
    assert {family for family, _ in _proposals("auto", 60)} == set(FAMILIES)
