"""Search spaces: one small function per classifier family.

Each function takes an Optuna trial (or a ``FixedTrial`` holding the best parameters) and returns the
three steps every fracfeat Pipeline has after its ``features`` step, always under the same names, so
``pipeline[1:]`` looks alike whatever the family::

    ("scale", StandardScaler | "passthrough"), ("reduce", PCA | "passthrough"), ("classifier", ...)

Parameter names carry the family as a prefix (``logreg_C``, ``svm_C``...), so "auto" can search all
families in one study without two families sharing one name and distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._deps import require
from ._errors import ConfigError

# PCA keeping this fraction of the variance; 1.0 means no PCA. Deep features are wide (512-2048)
# and correlated, so a linear model or an RBF kernel often does as well or better on fewer components.
PCA_VARIANCE = (0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class SearchContext:
    """What a search space needs to know of the data and the run."""

    seed: int = 0
    n_positive: int = 1
    n_negative: int = 1
    n_threads: int | None = None
    n_features: int = 512  # width of the feature rows, before PCA
    final: bool = False  # building the model to keep (the SVM then gets calibrated probabilities)

    @property
    def negative_to_positive(self) -> float:
        return self.n_negative / max(self.n_positive, 1)


def _scaled_and_reduced(trial, prefix: str, ctx: SearchContext) -> list:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    variance = trial.suggest_categorical(f"{prefix}_pca_variance", PCA_VARIANCE)
    reduce = "passthrough" if variance >= 1.0 else PCA(n_components=variance, svd_solver="full", random_state=ctx.seed)
    return [("scale", StandardScaler()), ("reduce", reduce)]


def _class_weight(trial, prefix: str):
    # About 18% of FracAtlas is fractured: "balanced" weighs each class by its inverse frequency.
    return {"balanced": "balanced", "none": None}[trial.suggest_categorical(f"{prefix}_class_weight", ("balanced", "none"))]


def logreg_steps(trial, ctx: SearchContext) -> list:
    """Logistic regression: inverse regularization strength, class weights, optional PCA."""
    from sklearn.linear_model import LogisticRegression

    steps = _scaled_and_reduced(trial, "logreg", ctx)
    clf = LogisticRegression(
        C=trial.suggest_float("logreg_C", 1e-4, 1e2, log=True),
        class_weight=_class_weight(trial, "logreg"),
        max_iter=2000,
        random_state=ctx.seed,
    )
    return steps + [("classifier", clf)]


def svm_steps(trial, ctx: SearchContext) -> list:
    """RBF-kernel SVC: C and gamma, class weights, optional PCA; probabilities in the final model.

    No linear kernel: libsvm's linear solver ran past 200,000 iterations on one fold of 2,600 FracAtlas
    VGG16 rows (RBF: 2,142 iterations, 2 s), stalling a whole study; linear boundaries are what the
    logreg family searches.

    Tuning scores the decision function. The kept model's probabilities come from
    :class:`SigmoidCalibrated` (an increasing sigmoid of the decision function fitted out of fold),
    never from libsvm's internal Platt scaling, whose sign can come out inverted on small sets.
    """
    from sklearn.svm import SVC

    from ._calibration import SigmoidCalibrated

    steps = _scaled_and_reduced(trial, "svm", ctx)
    C = trial.suggest_float("svm_C", 1e-2, 1e2, log=True)
    clf = SVC(kernel="rbf", C=C, gamma=_gamma(trial, ctx), class_weight=_class_weight(trial, "svm"), cache_size=500,
              random_state=ctx.seed)
    if ctx.final:
        clf = SigmoidCalibrated(clf, cv=5, random_state=ctx.seed)
    return steps + [("classifier", clf)]


def _gamma(trial, ctx: SearchContext) -> float:
    """The RBF kernel's gamma, searched as a multiple of scikit-learn's "scale", 1 / (total variance).

    On standardized rows (PCA keeping a fraction v of the variance) two images lie about
    sqrt(2 * v * n_features) apart, so gamma = k / (v * n_features) puts the kernel between them near
    exp(-2k), whatever the width of the features (512, 1,280, 1,792...). Past k = 3 the kernel between
    typical images falls below exp(-6) and the SVM becomes a look-up of its training images: on 96
    ungrouped radiographs such a trial (k = 35) scored CV ROC AUC 0.84 by matching near-duplicates, while
    its decision values on unseen images were one constant per fold, so no probability or threshold
    carried over. The tuned SVMs on FracAtlas chose k between 0.2 and 1.5.
    """
    k = trial.suggest_float("svm_gamma_scale", 5e-3, 3.0, log=True)
    variance = trial.params["svm_pca_variance"]  # suggested just before, by _scaled_and_reduced
    return k / (variance * max(ctx.n_features, 1))


def xgboost_steps(trial, ctx: SearchContext) -> list:
    """XGBoost: trees, depth, learning rate, subsampling, regularization, scale_pos_weight."""
    xgb = require("xgboost", why='classifier="xgboost"')
    balance = trial.suggest_categorical("xgb_scale_pos_weight", ("balanced", "none"))
    clf = xgb.XGBClassifier(
        n_estimators=trial.suggest_int("xgb_n_estimators", 50, 500, step=50),
        max_depth=trial.suggest_int("xgb_max_depth", 2, 8),
        learning_rate=trial.suggest_float("xgb_learning_rate", 0.01, 0.3, log=True),
        subsample=trial.suggest_float("xgb_subsample", 0.5, 1.0),
        colsample_bytree=trial.suggest_float("xgb_colsample_bytree", 0.2, 1.0),
        min_child_weight=trial.suggest_float("xgb_min_child_weight", 1.0, 20.0, log=True),
        reg_lambda=trial.suggest_float("xgb_reg_lambda", 1e-3, 10.0, log=True),
        scale_pos_weight=ctx.negative_to_positive if balance == "balanced" else 1.0,
        tree_method="hist",
        eval_metric="logloss",
        n_jobs=ctx.n_threads,
        random_state=ctx.seed,
    )
    # Trees need neither scaling nor PCA.
    return [("scale", "passthrough"), ("reduce", "passthrough"), ("classifier", clf)]


def mlp_steps(trial, ctx: SearchContext) -> list:
    """The recipes' dense head on a frozen backbone: scikit-learn's MLPClassifier (ReLU, Adam) on the
    stored features: one or two hidden layers, their width, L2 strength, learning rate, optional PCA.

    Early stopping holds out 10% of the training rows (not grouped: near-duplicates may sit on both
    sides, so it may stop a little late; the tuning folds themselves are grouped). MLPClassifier has
    no class weights: ``fit(balance=...)`` weighs its rows through ``sample_weight``.
    """
    from sklearn.neural_network import MLPClassifier

    steps = _scaled_and_reduced(trial, "mlp", ctx)
    units = trial.suggest_int("mlp_units", 32, 512, log=True)
    depth = trial.suggest_int("mlp_layers", 1, 2)
    clf = MLPClassifier(
        hidden_layer_sizes=(units,) if depth == 1 else (units, max(units // 4, 8)),
        alpha=trial.suggest_float("mlp_alpha", 1e-5, 10.0, log=True),
        learning_rate_init=trial.suggest_float("mlp_learning_rate", 1e-4, 1e-2, log=True),
        early_stopping=True, validation_fraction=0.1, n_iter_no_change=10, max_iter=300,
        random_state=ctx.seed,
    )
    return steps + [("classifier", clf)]


FAMILIES = {"logreg": logreg_steps, "svm": svm_steps, "xgboost": xgboost_steps, "mlp": mlp_steps}
CLASSIFIERS = (*FAMILIES, "auto")


def check_classifier(classifier: str) -> str:
    name = str(classifier).lower()
    if name not in CLASSIFIERS:
        raise ConfigError(f"classifier={classifier!r}: choose one of {', '.join(CLASSIFIERS)}")
    return name


def suggest_steps(trial, classifier: str, ctx: SearchContext) -> tuple[str, list]:
    """The family and steps of one trial; "auto" first picks the family."""
    family = trial.suggest_categorical("classifier", tuple(FAMILIES)) if classifier == "auto" else classifier
    return family, FAMILIES[family](trial, ctx)
