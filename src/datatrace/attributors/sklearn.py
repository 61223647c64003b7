"""Influence functions for fitted scikit-learn linear models, on the estimator's own objective.

:func:`from_sklearn` turns a fitted :class:`~sklearn.linear_model.LinearRegression`,
:class:`~sklearn.linear_model.Ridge` or :class:`~sklearn.linear_model.LogisticRegression` (binary or multinomial,
L2 or no penalty) into a fitted :class:`SklearnInfluence`: an :class:`~datatrace.InfluenceFunction` on a float64
``torch.nn.Linear`` that holds ``coef_`` and ``intercept_``, with a :class:`~datatrace.Task` whose objective *is*
the estimator's objective, rewritten in datatrace's mean form
``L(theta) = (1/n) sum_i l(z_i, theta) + sum_b lambda_b/2 ||theta_b||^2`` (:mod:`datatrace.tasks`). Multiplying an
objective by a positive constant changes neither its minimiser nor ``H^{-1} g``, so each estimator maps as follows
(``n`` training examples, ``w`` the weights, ``b`` the intercept):

* ``LinearRegression``: ``sum_i ||y_i - W x_i - b||^2`` -> ``RegressionTask()``, no weight decay.
* ``Ridge(alpha)``: ``sum_i ||y_i - W x_i - b||^2 + alpha ||W||^2`` -> ``RegressionTask`` with
  ``weight_decay={"weight": 2 alpha / n}`` (intercept unpenalised).
* ``LogisticRegression(C)``, L2, solvers lbfgs / newton-cg / newton-cholesky / sag / saga:
  ``C sum_i logloss_i + 1/2 ||W||^2`` -> ``ClassificationTask`` with ``weight_decay={"weight": 1 / (C n)}``.
* ``LogisticRegression(C, solver="liblinear")``, L2: ``C sum_i logloss_i + 1/2 ||w||^2 + 1/2 (b / s)^2`` with
  ``s = intercept_scaling`` -> ``weight_decay={"weight": 1 / (C n), "bias": 1 / (C n s^2)}``.
* ``LogisticRegression`` with ``C=np.inf`` (or ``penalty=None``): ``sum_i logloss_i`` -> no weight decay.

(liblinear fits the intercept as the weight of a synthetic feature of constant value ``s``, so ``b = s w_extra`` and
its penalty is ``1/2 (b/s)^2``; every other solver leaves the intercept unpenalised. ``RegressionTask`` is the squared
error without a factor 1/2, ``ClassificationTask`` the log-loss, as scikit-learn's.) The source of these scalings
is scikit-learn's ``sklearn/linear_model/_logistic.py`` (``l2_reg_strength = 1 / (C * n)`` applied to
``LinearModelLoss``, ``mean(logloss) + l2_reg_strength/2 ||w||^2``) and the Ridge user guide.

With the task fixed, everything follows from :mod:`datatrace.attributors.influence` (Koh & Liang 2017; Cook 1977 for the
linear case):

    theta_{-i} - theta_hat  ~  (1/n) H^{-1} g_i,        score[q, i] = (1/n) grad f_q^T H^{-1} g_i
                                                                     ~ f_q(theta_{-i}) - f_q(theta_hat).

For ordinary least squares the first-order change is exactly ``-(X1^T X1)^{-1} x1_i r_i`` (``x1 = [x, 1]``,
``r_i = y_i - yhat_i``); actual leave-one-out divides it by ``1 - h_ii`` (the leverage), so estimates agree with
retraining to a relative ``O(h_ii) = O(p/n)``.

Classification: binary problems use one logit (``classes_[1]`` is the positive class, as in scikit-learn); more
than two classes use the softmax over ``K`` logits (scikit-learn's multinomial parametrisation, ``K`` weight
vectors). With unpenalised intercepts the multinomial objective is flat along "add the same constant to every
intercept": the exact curvature's pseudo-inverse drops that direction, which no per-example gradient has a component
along, so the estimates are unaffected (:mod:`datatrace.curvature.dense`).

Labels stay in the estimator's own space: :class:`SklearnInfluence` maps ``y`` through ``classes_`` (strings,
arbitrary integers) in ``fit`` and ``score``; :meth:`SklearnInfluence.encode_targets` exposes the mapping.

Limits (checked where they can be):

* The estimator must have been fitted **without** ``sample_weight`` (a fitted estimator does not record it, so
  this cannot be checked; a weighted fit usually shows up as a stationarity warning).
* ``class_weight``, L1 and elastic-net penalties (``l1_ratio > 0``), ``positive=True``, one-vs-rest multiclass and
  per-target Ridge ``alpha`` arrays are refused with a ``ValueError`` that says what to do instead.
* Influence functions assume the estimator sits at the minimum of its objective. scikit-learn's default ``tol``
  (``1e-4``) stops early; the estimates are still computed at the estimator's coefficients, but retraining with the
  same ``tol`` (to verify them) then moves the coefficients by amounts comparable to removing one example. Fit with
  e.g. ``LogisticRegression(tol=1e-10, max_iter=10_000)``. :attr:`SklearnInfluence.convergence_ratio_` measures
  this and a warning is logged when it is large.

References:
    Koh, P. W. and Liang, P. (2017). Understanding black-box predictions via influence functions. ICML.
    Cook, R. D. (1977). Detection of influential observation in linear regression. Technometrics 19(1).

Example:
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from datatrace.attributors.sklearn import from_sklearn
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(80, 3)); y = np.where(X[:, 0] + rng.normal(size=80) > 0, "yes", "no")
    >>> clf = LogisticRegression(tol=1e-10, max_iter=10_000).fit(X, y)
    >>> inf = from_sklearn(clf, X, y)
    >>> inf.score((X[:2], y[:2])).values.shape
    torch.Size([2, 80])
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression, LogisticRegressionCV, Ridge
from torch import nn

from datatrace.attributors.influence import InfluenceFunction, Measurement
from datatrace.curvature import Curvature
from datatrace.data import DataLike
from datatrace.errors import bad_value, check_indices, describe
from datatrace.params import select_parameters
from datatrace.tasks import ClassificationTask, RegressionTask, Task

logger = logging.getLogger(__name__)

__all__ = ["CONVERGENCE_RATIO_WARNING", "SklearnInfluence", "from_sklearn"]

#: ``convergence_ratio_`` above which a warning is logged: the solver stopped further from the exact minimiser
#: than this fraction of a typical leave-one-out parameter change
CONVERGENCE_RATIO_WARNING = 0.1
#: examples used to estimate the typical leave-one-out parameter change for ``convergence_ratio_``
_CONVERGENCE_SAMPLE = 512
_RECOMMENDED_FIT = "refit with a tight tolerance, e.g. tol=1e-10 and max_iter=10_000"


# ---------------------------------------------------------------------------------------------------------------
# Reading the estimator
# ---------------------------------------------------------------------------------------------------------------
def _estimator_kind(estimator: Any) -> str:
    """``"linear"``, ``"ridge"`` or ``"logistic"``; raise a TypeError for anything else."""
    if isinstance(estimator, type):
        raise TypeError(
            f"estimator={estimator.__name__} is a class, not a fitted estimator. "
            f"Fix: pass a fitted instance, e.g. {estimator.__name__}().fit(X, y)."
        )
    if isinstance(estimator, LogisticRegressionCV):
        raise TypeError(
            f"estimator={describe(estimator)} is not supported: LogisticRegressionCV refits with a "
            "cross-validated C that this function does not reproduce. Fix: refit "
            "LogisticRegression(C=estimator.C_[0], tol=1e-10, max_iter=10_000) on the same data and pass that."
        )
    if isinstance(estimator, LinearRegression):
        return "linear"
    if isinstance(estimator, Ridge):
        return "ridge"
    if isinstance(estimator, LogisticRegression):
        return "logistic"
    hint = ""
    if hasattr(estimator, "steps"):
        hint = " For a Pipeline, pass its final estimator and the transformed training data X."
    raise TypeError(
        f"estimator={describe(estimator)} ({type(estimator).__name__}) is not supported: expected a fitted "
        "sklearn.linear_model.LinearRegression, Ridge or LogisticRegression. Fix: fit one of those, or wrap "
        f"another model as a torch.nn.Module and use datatrace.InfluenceFunction with a Task.{hint}"
    )


def _check_estimator_fitted(estimator: Any) -> None:
    if not hasattr(estimator, "coef_") or not hasattr(estimator, "n_features_in_"):
        raise bad_value(
            "estimator",
            estimator,
            f"this {type(estimator).__name__} is not fitted (it has no coef_)",
            f"call estimator.fit(X, y) on the training data first ({_RECOMMENDED_FIT})",
        )


def _logistic_penalty(estimator: Any) -> tuple[str | None, float]:
    """The effective penalty (``"l2"``, ``"l1"``, ``"elasticnet"`` or None) and C, replaying ``fit``'s logic.

    scikit-learn 1.8 deprecated ``penalty`` in favour of ``l1_ratio`` (0: L2, 1: L1) and ``C=np.inf`` (no penalty);
    older versions use ``penalty`` (with ``'none'`` before 1.2) directly.
    """
    penalty = getattr(estimator, "penalty", "l2")
    l1_ratio = getattr(estimator, "l1_ratio", None)
    C = float(estimator.C)
    if penalty == "deprecated":
        if l1_ratio is None or l1_ratio == 0:
            penalty = "l2"
        elif l1_ratio == 1:
            penalty = "l1"
        else:
            penalty = "elasticnet"
    if penalty == "none":
        penalty = None
    if penalty == "elasticnet" and l1_ratio is not None and l1_ratio == 0:
        penalty = "l2"  # saga's elastic net with no L1 part is the L2 penalty
    if penalty is None or C == math.inf:
        return None, math.inf
    return penalty, C


def _linear_layer(coef: np.ndarray, intercept: np.ndarray | None) -> nn.Linear:
    """A float64 ``nn.Linear`` with ``weight = coef`` (``(k, d)``) and ``bias = intercept`` (``(k,)``) or no bias."""
    k, d = coef.shape
    layer = nn.Linear(d, k, bias=intercept is not None, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(coef, dtype=torch.float64))
        if intercept is not None:
            layer.bias.copy_(torch.as_tensor(intercept, dtype=torch.float64))
    return layer


def _as_2d(array: Any) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    return a.reshape(1, -1) if a.ndim == 1 else a


def _translate(estimator: Any) -> tuple[str, nn.Linear, Task, np.ndarray | None, int | None]:
    """``(kind, module, task, classes, n_outputs)`` for a supported, fitted estimator.

    ``classes`` is ``classes_`` for classifiers (None for regressors); ``n_outputs`` is the number of regression
    targets (None for classifiers), 1 for a 1-D ``y``. The task's ``weight_decay`` carries the penalty *without*
    ``1/n``; :func:`scale_weight_decay` divides by the number of training examples once it is known.
    """
    kind = _estimator_kind(estimator)
    _check_estimator_fitted(estimator)
    fit_intercept = bool(getattr(estimator, "fit_intercept", True))
    coef = _as_2d(estimator.coef_)
    intercept = _as_2d(estimator.intercept_).reshape(-1) if fit_intercept else None
    if kind in ("linear", "ridge"):
        if getattr(estimator, "positive", False):
            raise bad_value(
                "estimator",
                estimator,
                "positive=True constrains the coefficients, and influence functions need an unconstrained "
                "minimum (active constraints break the first-order condition)",
                "refit with positive=False",
            )
        n_outputs = 1 if np.ndim(estimator.coef_) == 1 else int(coef.shape[0])
        module = _linear_layer(coef, intercept)
        if kind == "linear":
            return kind, module, RegressionTask(), None, n_outputs
        alpha = np.asarray(estimator.alpha, dtype=np.float64).reshape(-1)
        if alpha.size > 1 and not np.all(alpha == alpha[0]):
            raise bad_value(
                "estimator.alpha",
                estimator.alpha,
                "one alpha per target gives each output its own penalty, which one weight tensor cannot carry",
                "fit one Ridge per target (each with its own alpha) and call from_sklearn on each",
            )
        if not alpha[0] >= 0:
            raise bad_value(
                "estimator.alpha", estimator.alpha, "expected alpha >= 0", "refit with alpha >= 0"
            )
        # sum_i ||r_i||^2 + alpha ||W||^2  =  n * [ mean_i ||r_i||^2 + (2 alpha / n)/2 ||W||^2 ]
        return kind, module, RegressionTask(weight_decay={"weight": 2.0 * float(alpha[0])}), None, n_outputs

    # -- LogisticRegression ------------------------------------------------------------------------------------
    if getattr(estimator, "class_weight", None) is not None:
        raise bad_value(
            "estimator.class_weight",
            estimator.class_weight,
            "class weights make each example's loss weighted, which the unweighted objective here does not model",
            "refit with class_weight=None (or rebalance the data by resampling)",
        )
    penalty, C = _logistic_penalty(estimator)
    if penalty not in ("l2", None):
        explicit = getattr(estimator, "penalty", "deprecated") not in ("deprecated", None)
        raise bad_value(
            "estimator.penalty" if explicit else "estimator.l1_ratio",
            estimator.penalty if explicit else getattr(estimator, "l1_ratio", None),
            f"the estimator's penalty is {penalty!r}; an L1 term is not twice differentiable at zero and its "
            "zero coefficients are held there by the kink, so influence functions do not apply",
            "refit with the L2 penalty (l1_ratio=0, or penalty='l2' in scikit-learn < 1.8) or C=np.inf",
        )
    classes = np.asarray(estimator.classes_)
    n_classes = len(classes)
    solver = getattr(estimator, "solver", "lbfgs")
    multi_class = getattr(estimator, "multi_class", "auto")
    if n_classes > 2 and (solver == "liblinear" or multi_class == "ovr"):
        raise bad_value(
            "estimator.solver" if solver == "liblinear" else "estimator.multi_class",
            solver if solver == "liblinear" else multi_class,
            f"with {n_classes} classes this fits one-vs-rest, i.e. {n_classes} separate binary models, not one "
            "objective",
            "refit with a multinomial solver (solver='lbfgs', 'newton-cg', 'newton-cholesky', 'sag' or 'saga'), "
            "or call from_sklearn on each binary model yourself",
        )
    if n_classes == 2 and multi_class == "multinomial":
        raise bad_value(
            "estimator.multi_class",
            multi_class,
            "a binary multinomial fit (scikit-learn < 1.5) penalises two symmetric weight vectors and stores "
            "their difference, a parametrisation this function does not rebuild",
            "refit with multi_class='auto' (the default)",
        )
    if n_classes < 2:
        raise bad_value("estimator.classes_", classes, "at least two classes", "fit on data with two classes")
    module = _linear_layer(coef, intercept)
    decay: dict[str, float] = {}
    if penalty == "l2":
        # C sum_i l_i + 1/2 ||w||^2  =  C n [ mean_i l_i + (1/(C n))/2 ||w||^2 ]
        decay["weight"] = 1.0 / C
        if solver == "liblinear" and fit_intercept:
            scaling = float(estimator.intercept_scaling)
            decay["bias"] = 1.0 / (C * scaling**2)
    return kind, module, ClassificationTask(weight_decay=decay), classes, None


def scale_weight_decay(task: Task, n: int) -> Task:
    """The same task with every ``lambda`` divided by ``n`` (sum form -> datatrace's mean form)."""
    decay = task.weight_decay
    scaled = {k: v / n for k, v in decay.items()} if isinstance(decay, dict) else float(decay) / n
    return type(task)(weight_decay=scaled)


# ---------------------------------------------------------------------------------------------------------------
# The attributor
# ---------------------------------------------------------------------------------------------------------------
class SklearnInfluence(InfluenceFunction):
    """An :class:`~datatrace.InfluenceFunction` for a fitted scikit-learn linear model, in the estimator's units.

    Build it with :func:`from_sklearn` (which also fits it). ``fit`` and ``score`` accept ``(X, y)`` as given to
    the estimator: ``X`` an array-like of shape ``(m, n_features_in_)`` (dense or scipy sparse), ``y`` the labels
    in the estimator's own label space (anything in ``classes_``) or the regression targets. A torch ``Dataset``,
    ``DataLoader`` or :class:`~datatrace.data.DataSource` is passed through untouched: its labels must then already
    be encoded (:meth:`encode_targets`).

    Attributes (after fitting):
        estimator_: the scikit-learn estimator (not modified).
        module_: the float64 ``torch.nn.Linear`` holding ``coef_`` (``weight``) and ``intercept_`` (``bias``,
            absent when ``fit_intercept=False``).
        task_: the :class:`~datatrace.Task` whose mean-form objective equals the estimator's (see the module
            docstring for the mapping), with ``weight_decay`` scaled by the number of training examples.
        classes_: the estimator's classes (classifiers) or None.
        convergence_ratio_: ``||H^{-1} grad L|| / mean_i ||(1/n) H^{-1} g_i||``: how far (one Newton step) the
            estimator's coefficients are from the exact minimiser, relative to a typical leave-one-out change.
            Below ~0.01 retraining with the same settings verifies the estimates; above
            :data:`CONVERGENCE_RATIO_WARNING` a warning is logged.
    """

    def __init__(
        self,
        estimator: Any,
        *,
        curvature: str | Curvature = "exact",
        damping: float | str = "auto",
        progress: bool = False,
        **influence_kwargs: Any,
    ) -> None:
        kind, module, task, classes, n_outputs = _translate(estimator)
        for reserved in ("model", "task"):
            if reserved in influence_kwargs:
                raise bad_value(
                    reserved,
                    influence_kwargs[reserved],
                    "from_sklearn builds the model and the task from the estimator",
                    f"do not pass {reserved}=; use datatrace.InfluenceFunction directly for your own model",
                )
        if influence_kwargs.get("params") is not None:
            # hold out-of-scope parameters (e.g. the intercept) fixed: without requires_grad they are constants
            # of the per-example gradients rather than leaves of an autograd graph kept alive by every row
            in_scope = select_parameters(module, influence_kwargs["params"])
            for name, parameter in module.named_parameters():
                parameter.requires_grad_(name in in_scope)
        # the convergence check reads train_grads_: keep them (above max_bytes, a MemoryError names the fixes)
        influence_kwargs.setdefault("keep_gradients", True)
        super().__init__(
            module, task, curvature=curvature, damping=damping, progress=progress, **influence_kwargs
        )
        self.estimator_ = estimator
        self.kind_ = kind
        self.module_ = module
        self.classes_ = classes
        self.n_outputs_ = n_outputs
        self._sum_task = task  # weight_decay without the 1/n, rescaled in fit

    # -- the estimator's label space ---------------------------------------------------------------------------
    def encode_targets(self, y: Any, name: str = "y") -> np.ndarray:
        """``y`` as the task needs it: class indices into ``classes_`` (int64) or float64 regression targets.

        Raises a ValueError naming ``name`` for labels not in ``classes_`` or targets of the wrong shape.
        """
        try:
            y_arr = np.asarray(y)
        except (TypeError, ValueError):
            raise bad_value(
                name, y, "expected an array-like of labels or targets", "pass a 1-D array"
            ) from None
        if self.classes_ is None:
            try:
                target = y_arr.astype(np.float64)
            except (TypeError, ValueError):
                raise bad_value(name, y, "regression targets must be numbers", "pass a float array") from None
            k = self.n_outputs_ or 1
            if target.ndim == 1 and k == 1:
                return target
            if target.ndim == 2 and target.shape[1] == k:
                return target
            expected = "(n,)" if k == 1 and np.ndim(self.estimator_.coef_) == 1 else f"(n, {k})"
            raise bad_value(
                name,
                y,
                f"the estimator predicts {k} target(s) per example, so y must have shape {expected}",
                f"pass targets of shape {expected}",
            )
        if y_arr.ndim == 2 and y_arr.shape[1] == 1:
            y_arr = y_arr.reshape(-1)
        if y_arr.ndim != 1:
            raise bad_value(name, y, "class labels must be 1-D, one per example", "pass y of shape (n,)")
        lookup = {c: k for k, c in enumerate(self.classes_.tolist())}
        encoded = np.empty(len(y_arr), dtype=np.int64)
        for position, label in enumerate(y_arr.tolist()):
            try:
                encoded[position] = lookup[label]
            except (KeyError, TypeError):
                raise bad_value(
                    f"{name}[{position}]",
                    label,
                    f"labels must be among the estimator's classes_ {self.classes_.tolist()[:20]}",
                    "pass labels in the estimator's own label space (as given to estimator.fit)",
                ) from None
        return encoded

    def _features(self, X: Any, name: str) -> np.ndarray:
        if hasattr(X, "toarray") and callable(X.toarray):  # scipy sparse
            X = X.toarray()
        try:
            arr = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError):
            raise bad_value(name, X, "expected a numeric array-like", "pass a float array") from None
        n_features = int(self.estimator_.n_features_in_)
        if arr.ndim != 2 or arr.shape[1] != n_features:
            raise bad_value(
                name,
                arr,
                f"the estimator was fitted on {n_features} feature(s), so X must have shape (n, {n_features})",
                "pass data with the same columns (and preprocessing) as the estimator was fitted on",
            )
        return arr

    def _prepare_xy(self, X: Any, y: Any, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X float64, encoded y)``, checked against the estimator; errors name ``x_name`` / ``y_name``."""
        X_arr = self._features(X, x_name)
        y_arr = self.encode_targets(y, y_name)
        if len(X_arr) != len(y_arr):
            raise ValueError(
                f"{x_name} has {len(X_arr)} row(s) but {y_name} has {len(y_arr)}: each example needs one label "
                f"or target. Fix: pass {x_name} and {y_name} of the same length."
            )
        return X_arr, y_arr

    def prepare_data(self, data: DataLike, name: str) -> DataLike:
        """``(X, y)`` in the estimator's space -> ``(X float64, encoded y)``; other data forms pass through."""
        if not isinstance(data, (tuple, list)):
            return data
        if len(data) != 2:
            raise bad_value(
                name,
                data,
                f"expected a pair (X, y), got a sequence of length {len(data)}",
                "pass (X, y) as given to the estimator",
            )
        return self._prepare_xy(data[0], data[1], f"{name}[0]", f"{name}[1]")

    # -- fitting and queries -----------------------------------------------------------------------------------
    def fit(self, train: DataLike) -> SklearnInfluence:
        """Fit on the data the estimator was trained on, ``(X, y)`` as passed to ``estimator.fit``.

        The task's weight decay is rescaled to the number of training examples here (scikit-learn's penalties
        are on the *summed* loss), so ``train`` must be the whole training set, unweighted.
        """
        return self._fit_prepared(self.prepare_data(train, "train"))

    def _fit_prepared(self, prepared: DataLike) -> SklearnInfluence:
        n = len(prepared[0]) if isinstance(prepared, tuple) else len(prepared)
        self.task = scale_weight_decay(self._sum_task, n)
        self.task_ = self.task
        super().fit(prepared)
        self._check_convergence()
        return self

    def query_gradients(self, query: DataLike, measurement: Measurement | None = None) -> torch.Tensor:
        """``grad f_q(theta_hat)`` for queries ``(X, y)`` in the estimator's label space, shape ``(m, p)``."""
        return super().query_gradients(self.prepare_data(query, "query"), measurement)

    def _check_convergence(self) -> None:
        fmodel = self.fmodel_
        grads = self.train_grads_
        full = grads.mean(dim=0) + fmodel.regularizer * fmodel.theta
        step = self.curvature_.solve(full.unsqueeze(0))[0]
        n = self.n_train_
        sample = torch.linspace(0, n - 1, min(n, _CONVERGENCE_SAMPLE)).round().long().unique()
        typical = float((self.curvature_.solve(grads[sample]) / n).norm(dim=1).mean())
        distance = float(step.norm())
        self.convergence_ratio_ = distance / typical if typical > 0 else (0.0 if distance == 0 else math.inf)
        if self.convergence_ratio_ > CONVERGENCE_RATIO_WARNING:
            logger.warning(
                "%s's coefficients are %.3g parameter units (one Newton step) from the exact minimum of the "
                "objective datatrace rebuilt, %.3g times a typical leave-one-out change (%.3g). Either its solver "
                "stopped early (tol=%r, n_iter_=%s) or it was fitted on other data or with sample_weight. The "
                "estimates are computed at the estimator's coefficients, but retraining with the same settings "
                "will not be accurate enough to verify them. Fix: %s, on exactly the (X, y) given here.",
                type(self.estimator_).__name__,
                distance,
                self.convergence_ratio_,
                typical,
                getattr(self.estimator_, "tol", None),
                np.asarray(getattr(self.estimator_, "n_iter_", None)).tolist(),
                _RECOMMENDED_FIT,
            )
        else:
            logger.info(
                "%s is %.3g typical leave-one-out changes from the exact minimum of its objective.",
                type(self.estimator_).__name__,
                self.convergence_ratio_,
            )

    # -- results in scikit-learn's shapes ---------------------------------------------------------------------
    def coef_change(self, indices: Any) -> dict[str, np.ndarray]:
        """Estimated change of ``coef_`` and ``intercept_`` when each example of ``indices`` is left out.

        Returns ``{"coef_": (m, *coef_.shape), "intercept_": (m, *intercept_.shape)}`` as float64 numpy arrays,
        comparable with ``retrained.coef_ - estimator.coef_`` (zeros for an intercept that is not fitted or not in
        scope).
        """
        self.check_is_fitted()
        idx = check_indices("indices", indices, self.n_train_)
        change = self.params_change(idx)
        m = len(idx)
        coef_shape = np.shape(self.estimator_.coef_)
        intercept_shape = np.shape(self.estimator_.intercept_)
        coef = change.get("weight")
        bias = change.get("bias")
        coef_np = np.zeros((m, *coef_shape)) if coef is None else coef.detach().cpu().double().numpy()
        bias_np = np.zeros((m, *intercept_shape)) if bias is None else bias.detach().cpu().double().numpy()
        return {
            "coef_": coef_np.reshape(m, *coef_shape),
            "intercept_": bias_np.reshape(m, *intercept_shape),
        }


def from_sklearn(
    estimator: Any,
    X: Any,
    y: Any,
    *,
    curvature: str | Curvature = "exact",
    damping: float | str = "auto",
    progress: bool = False,
    **influence_kwargs: Any,
) -> SklearnInfluence:
    """A fitted influence function for a fitted scikit-learn linear model, on the estimator's exact objective.

    Supported: ``LinearRegression``, ``Ridge`` (1-D or multi-output ``y``, one ``alpha``) and
    ``LogisticRegression`` (binary, or multinomial with any solver but liblinear; L2 or no penalty; any
    ``intercept_scaling`` for liblinear). The objective mapping is in the :mod:`datatrace.attributors.sklearn` docstring;
    ``score[q, i] = (1/n) grad f_q^T H^{-1} g_i ~ f_q(theta_{-i}) - f_q(theta_hat)``, the change of query ``q``'s
    loss (squared error, or log-loss in nats) if training example ``i`` were removed and the estimator refitted.

    Args:
        estimator: a fitted estimator, fitted on exactly ``(X, y)`` **without** ``sample_weight`` and with a
            tight tolerance (e.g. ``tol=1e-10, max_iter=10_000``) so that it sits at its minimum.
        X: the training inputs given to ``estimator.fit``, shape ``(n, n_features_in_)``.
        y: the training labels or targets given to ``estimator.fit`` (labels in the estimator's own space).
        curvature: inverse-curvature route (default ``"exact"``: the dense Hessian, exact for these models).
        damping: added to the curvature's eigenvalues (``"auto"``: none for a convex objective).
        progress: show progress bars.
        **influence_kwargs: passed to :class:`~datatrace.InfluenceFunction` (``params``, ``dtype``,
            ``batch_size``).

    Returns:
        a fitted :class:`SklearnInfluence`; ``.score((X_test, y_test))`` takes labels in the estimator's space,
        ``.coef_change(indices)`` gives parameter changes in ``coef_``/``intercept_`` shapes, ``.module_`` and
        ``.task_`` are the torch model and task.

    Raises:
        TypeError: unsupported estimator type. ValueError: an unfitted estimator, an unsupported setting
        (class_weight, L1/elastic-net, positive, one-vs-rest), or ``X``/``y`` that do not match the estimator.

    Example:
        >>> import numpy as np
        >>> from sklearn.linear_model import Ridge
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(50, 3)), rng.normal(size=50)
        >>> inf = from_sklearn(Ridge(alpha=1.0).fit(X, y), X, y)
        >>> inf.task_.weight_decay  # 2 * alpha / n on the weights, intercept unpenalised
        {'weight': 0.04}
        >>> inf.coef_change([0, 1])["coef_"].shape
        (2, 3)
    """
    influence = SklearnInfluence(
        estimator, curvature=curvature, damping=damping, progress=progress, **influence_kwargs
    )
    return influence._fit_prepared(influence._prepare_xy(X, y, "X", "y"))
