"""Training-set attacks (Koh & Liang 2017, section 5.2): perturb training inputs to change a test prediction.

**The perturbation direction.** Change training input ``x_i`` to ``x_i + delta`` (its label and weight unchanged).
The training objective ``L(theta) = (1/n) sum_j l(z_j, theta) + R(theta)`` gains ``(1/n) [l((x_i + delta, y_i),
theta) - l(z_i, theta)]``, and its stationarity condition, expanded at ``theta_hat``, gives

    theta(delta) - theta_hat  ~  -(1/n) H^{-1} [g_i(x_i + delta) - g_i(x_i)]  ~  -(1/n) H^{-1} (d g_i / d x_i) delta,

with ``g_i(x) = grad_theta l((x, y_i), theta_hat)``. A query measurement ``f`` (by default the query's loss, summed
over the query rows) therefore changes by ``grad f^T (theta(delta) - theta_hat) ~ I_pert . delta`` with

    I_pert = -(1/n) (d g_i / d x_i)^T H^{-1} grad f  =  -(1/n) grad_x [ g_i(x)^T H^{-1} grad f ]  at x = x_i.

This is Koh & Liang's ``I_pert,loss(z, z_test)^T = -grad f^T H^{-1} grad_x grad_theta l(z, theta_hat)`` with the
``1/n`` of datatrace's mean-normalised objective. In terms of the leave-one-out score
``score[q, i] = (1/n) grad f^T H^{-1} g_i`` (removing ``i``, datatrace's convention), ``I_pert = -grad_x score[q, i]``
with ``H^{-1} grad f`` held fixed: moving ``x_i`` so that the example supports the query *less* (its removal score
falls) raises the query's loss. ``perturbation_direction`` returns ``I_pert``: the first-order change of ``f`` per
unit change of each input coordinate of ``x_i``; stepping along ``+I_pert`` raises the query's loss.

**The attack.** :func:`attack` picks the ``n_points`` training examples that help the query most (largest
positive leave-one-out scores), moves each input by ``steps`` sign-gradient steps of size ``step`` along its
``I_pert`` (recomputed at the moved input, ``H^{-1} grad f`` kept at ``theta_hat``), clipped to the data range,
then retrains with ``train_fn`` and reports the actual change of the query's loss and prediction beside the
predicted one. The prediction ``after_predicted`` uses the exact input difference of the training gradients,
``f + -(1/n) (H^{-1} grad f)^T sum_i [g_i(x_i') - g_i(x_i)]``, first order in the parameters only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import grad

from datatrace.apps.common import as_numpy, call_train, per_example, prepare_query
from datatrace.attributors.base import Measurement
from datatrace.attributors.influence import InfluenceFunction
from datatrace.data import DataLike, as_data_source
from datatrace.errors import bad_value, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["AttackResult", "attack", "perturbation_direction"]


def _check_influence(influence: Any) -> InfluenceFunction:
    if not isinstance(influence, InfluenceFunction) or not influence.is_fitted:
        raise bad_value(
            "influence",
            influence,
            "expected a fitted datatrace.InfluenceFunction (it needs the model, the fitted curvature and the "
            "training data)",
            "pass datatrace.InfluenceFunction(model, task).fit(train)",
        )
    return influence


def _solved_query(
    influence: InfluenceFunction, query: DataLike, measurement: Measurement | None
) -> torch.Tensor:
    """``H^{-1} grad f`` with ``f`` the measurement summed over the query rows, shape ``(p,)``."""
    q_grads = influence.query_gradients(query, measurement)
    return influence.solve(q_grads.sum(dim=0, keepdim=True))[0]


def _example(influence: InfluenceFunction, index: int) -> tuple[torch.Tensor, tuple]:
    fmodel = influence.functional_model
    batch = fmodel.prepare(influence.training_data.get([index]))
    x = batch[0]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise bad_value(
            "train_index",
            index,
            "the training inputs must be a floating-point tensor to be perturbed",
            "attack a model whose first batch element is a float input",
        )
    return x[0], tuple(t[0] for t in batch[1:])


def _gv(influence: InfluenceFunction, x: torch.Tensor, rest: tuple, v: torch.Tensor) -> torch.Tensor:
    """``g_i(x)^T v``: the training gradient of ``(x, rest)`` at ``theta_hat`` against ``v``."""
    fmodel = influence.functional_model

    def loss(theta: torch.Tensor) -> torch.Tensor:
        batch = (x.unsqueeze(0), *(t.unsqueeze(0) for t in rest))
        return fmodel.losses(theta, batch)[0]

    return grad(loss)(fmodel.theta) @ v


def _direction(influence: InfluenceFunction, x: torch.Tensor, rest: tuple, v: torch.Tensor) -> torch.Tensor:
    return -grad(lambda xx: _gv(influence, xx, rest, v))(x).detach() / influence.n_train


def perturbation_direction(
    influence: InfluenceFunction, train_index: int, query: DataLike, measurement: Measurement | None = None
) -> torch.Tensor:
    """``I_pert``: the gradient of the query's measurement with respect to training input ``x_i`` (module docstring).

    ``f(theta(x_i + delta)) - f(theta_hat) ~ I_pert . delta`` for a small ``delta``; stepping along ``+I_pert``
    raises the query's loss. ``f`` is the task's measurement (or ``measurement``) summed over the query rows.

    Args:
        influence: a fitted :class:`~datatrace.InfluenceFunction`.
        train_index: the training example whose input is perturbed.
        query: the query data.
        measurement: optional ``(model, batch) -> (b,)`` replacing the task's measurement.

    Returns:
        a float tensor of the shape of one training input.
    """
    influence = _check_influence(influence)
    n = influence.n_train
    if (
        isinstance(train_index, bool)
        or not isinstance(train_index, (int, np.integer))
        or not -n <= train_index < n
    ):
        raise bad_value("train_index", train_index, f"expected an int in [0, {n})", "pass one training index")
    x, rest = _example(influence, int(train_index) % n)
    v = _solved_query(influence, query, measurement)
    return _direction(influence, x, rest, v)


@dataclass
class AttackResult:
    """What perturbing a few training inputs did to the query, predicted and verified by retraining.

    Attributes:
        before: the query's loss (task measurement, summed over query rows) under the trained model.
        after_predicted: the first-order prediction after perturbing (module docstring).
        after_retrained: the actual value after retraining on the perturbed training set with ``train_fn``.
        changed_indices: the training examples whose inputs were perturbed, most helpful to the query first.
        flipped: whether the predicted class of any query row changed after retraining.
        predictions_before, predictions_after: ``(n_query,)`` predicted classes (argmax of the outputs; for one
            logit, ``logit > 0``).
        perturbations: ``(len(changed_indices), *input_shape)`` the applied ``x_i' - x_i``.
        bounds: the ``(low, high)`` range inputs were clipped to.
    """

    before: float
    after_predicted: float
    after_retrained: float
    changed_indices: np.ndarray
    flipped: bool
    predictions_before: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    predictions_after: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    perturbations: np.ndarray | None = None
    bounds: tuple[float, float] = (-np.inf, np.inf)

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "after_predicted": self.after_predicted,
            "after_retrained": self.after_retrained,
            "changed_indices": self.changed_indices.tolist(),
            "flipped": self.flipped,
            "predictions_before": self.predictions_before.tolist(),
            "predictions_after": self.predictions_after.tolist(),
        }


def _predict(model: torch.nn.Module, task: Any, query: DataLike) -> np.ndarray:
    def classes(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        out = task.outputs(m, batch) if task.has_outputs else m(batch[0])
        if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
            return (out.reshape(-1) > 0).to(torch.float64)
        return out.argmax(dim=1).to(torch.float64)

    return per_example(model, classes, query, "query").astype(np.int64)


def attack(
    influence: InfluenceFunction,
    train: DataLike,
    query: DataLike,
    train_fn: Callable[..., Any],
    n_points: int = 1,
    step: float | None = None,
    steps: int = 10,
    bounds: tuple[float, float] | None = None,
) -> AttackResult:
    """Perturb the most helpful training inputs to raise the query's loss; retrain and report what happened.

    Args:
        influence: a fitted :class:`~datatrace.InfluenceFunction`, fitted on ``train``.
        train: the training data as a tuple ``(X, y, ...)`` of tensors or numpy arrays (``X`` is perturbed; the
            perturbed copy keeps the same form).
        query: the query (usually one test example) ``(x, y)``.
        train_fn: ``train_fn(train) -> model``, e.g. warm-started L-BFGS from the trained weights.
        n_points: how many training examples to perturb (the most helpful to the query first).
        step: size of each sign-gradient step (default ``2%`` of the data range).
        steps: number of steps per example (an L-infinity budget of ``step * steps``).
        bounds: ``(low, high)`` the inputs are clipped to (default: the training inputs' min and max).

    Returns:
        :class:`AttackResult`.
    """
    influence = _check_influence(influence)
    if not isinstance(train, (tuple, list)) or len(train) < 2:
        raise bad_value(
            "train",
            train,
            "expected a tuple (X, y, ...) of tensors or numpy arrays",
            "pass (X_train, y_train)",
        )
    if not callable(train_fn):
        raise bad_value(
            "train_fn", train_fn, "expected a callable train_fn(data) -> model", "pass a function"
        )
    n = influence.n_train
    if len(as_data_source(train, "train")) != n:
        raise bad_value(
            "train",
            train,
            f"the attributor was fitted on {n} examples; train has a different number",
            "pass it",
        )
    check_positive_int("n_points", n_points)
    if n_points > n:
        raise bad_value("n_points", n_points, f"at most the number of training examples ({n})", "pass fewer")
    check_positive_int("steps", steps)
    is_numpy = isinstance(train[0], np.ndarray)
    X = torch.as_tensor(train[0])
    if not X.is_floating_point():
        raise bad_value("train", train, "the inputs train[0] must be floating point", "cast X to float")
    if bounds is None:
        low, high = float(X.min()), float(X.max())
    else:
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise bad_value("bounds", bounds, "expected a pair (low, high)", "pass e.g. (0.0, 1.0)") from None
        if not low < high:
            raise bad_value("bounds", bounds, "expected low < high", "pass e.g. (0.0, 1.0)")
    if step is None:
        step = 0.02 * (high - low) if high > low else 0.01
    try:
        step = float(step)
    except (TypeError, ValueError):
        raise bad_value("step", step, "expected a positive number", "pass e.g. 0.02") from None
    if not step > 0 or not np.isfinite(step):
        raise bad_value("step", step, "expected a finite positive number", "pass e.g. 0.02")

    task = influence.task
    model = influence.fitted_model
    query_data = prepare_query(influence, query, "query")
    before = float(per_example(model, task.measurement, query_data, "query").sum())
    pred_before = _predict(model, task, query_data)
    v = _solved_query(influence, query, None)
    helpfulness = as_numpy(influence.train_grads_ @ v) / n  # score summed over the query rows
    chosen = np.argsort(-helpfulness, kind="stable")[:n_points]

    X_new = X.clone()
    predicted = before
    perturbations = []
    for i in chosen.tolist():
        x0, rest = _example(influence, i)
        x = x0.clone()
        for _ in range(steps):
            d = _direction(influence, x, rest, v)
            x = (x + step * torch.sign(d)).clamp(low, high)
        change = -(float(_gv(influence, x, rest, v)) - float(_gv(influence, x0, rest, v))) / n
        predicted += change
        X_new[i] = x.to(X_new.dtype)
        perturbations.append((x - x0).detach().cpu().numpy())
    data = (X_new.numpy() if is_numpy else X_new, *train[1:])
    retrained = call_train(train_fn, data, seed=0)
    after = float(per_example(retrained, task.measurement, query_data, "query").sum())
    pred_after = _predict(retrained, task, query_data)
    flipped = bool((pred_after != pred_before).any())
    logger.info(
        "attack: perturbed %d training inputs; query measurement %.4g -> %.4g predicted, %.4g retrained%s",
        len(chosen),
        before,
        predicted,
        after,
        "; prediction flipped" if flipped else "",
    )
    return AttackResult(
        before=before,
        after_predicted=predicted,
        after_retrained=after,
        changed_indices=chosen.astype(np.int64),
        flipped=flipped,
        predictions_before=pred_before,
        predictions_after=pred_after,
        perturbations=np.stack(perturbations),
        bounds=(low, high),
    )
