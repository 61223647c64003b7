"""The proximal Bregman response function (PBRF), the quantity influence functions on networks estimate.

Bae, Ng, Lo, Ghassemi and Grosse (2022), "If influence functions are the answer, then what is the question?"
(NeurIPS), show that for a network trained to a point ``theta_hat`` that is not an exact, isolated minimum,
influence functions with the damped Gauss-Newton curvature are the first-order approximation not of
leave-one-out retraining but of the minimiser of

    theta_eps = argmin_theta  (1/n) sum_j D_out(o_j(theta), o_j(theta_hat); y_j)
                              + eps * l(z_m, theta)
                              + sum_b lambda_b/2 ||theta_b - theta_hat_b||^2
                              + damping/2 ||theta - theta_hat||^2

where ``o_j`` are the model outputs of training example ``j`` (``task.outputs``), ``D_out(o, o'; y) = l(o, y) -
l(o', y) - d l(o', y)/d o . (o - o')`` is the Bregman divergence of the loss in output space (zero with zero
gradient at ``o = o'``), ``lambda_b`` is the task's weight decay and ``eps = -1/n`` removes example ``m``.

About the weight-decay term: the training objective's regulariser ``R(theta) = sum_b lambda_b/2 ||theta_b||^2``
enters through its own Bregman divergence ``R(theta) - R(theta_hat) - grad R(theta_hat) . (theta - theta_hat)
= sum_b lambda_b/2 ||theta_b - theta_hat_b||^2``: a proximal term around ``theta_hat``. (Putting ``R(theta)`` in
as is would move the minimiser away from ``theta_hat`` even at ``eps = 0``, because ``grad R(theta_hat) != 0``
at a network's end point where the data term's gradient balances it.) The Hessian of this objective at
``theta_hat`` is ``G + diag(lambda) + damping I``, which is exactly the curvature of ``curvature="gauss-newton"``
with the same damping, and its gradient is ``eps * g_m``; so

    theta_eps - theta_hat = -eps (G + diag(lambda) + damping)^{-1} g_m + O(eps^2),

and with ``eps = -1/n`` the change of any measurement agrees to first order with
``InfluenceFunction(..., curvature="gauss-newton", damping=damping).score(query)[:, m]``.

:func:`pbrf_response` solves the problem with full-batch L-BFGS (strong-Wolfe line search) in float64, starting
at ``theta_hat``, and returns the change of each query's measurement. It is a reference target for estimators on
networks, where actual leave-one-out retraining depends on the training run (seed, end point) and is not what
any influence approximation estimates.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.apps.common import per_example
from datatrace.data import DataLike, as_data_source, cast_batch
from datatrace.errors import bad_value, check_positive_int
from datatrace.params import select_parameters
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

__all__ = ["pbrf_response"]


def _check_model_task(model: Any, task: Any) -> None:
    if not isinstance(model, nn.Module):
        raise bad_value("model", model, "expected a trained torch.nn.Module", "pass the network at theta_hat")
    if not isinstance(task, Task):
        raise bad_value("task", task, "expected a datatrace.Task", "pass e.g. datatrace.ClassificationTask()")
    if not task.has_outputs:
        raise bad_value(
            "task",
            task,
            "the PBRF needs the loss split into outputs(model, batch) and loss_from_outputs(outputs, batch) "
            "(the Bregman divergence is taken in output space)",
            "define both methods on the task (the built-in tasks do)",
        )


def pbrf_response(
    model: nn.Module,
    task: Task,
    train: DataLike,
    index: int,
    query: DataLike,
    epsilon: float | None = None,
    damping: float = 0.0,
    measurement: Any = None,
    *,
    params: str | list[str] | None = None,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-10,
    rounds: int = 5,
) -> np.ndarray:
    """Change of every query's measurement at the proximal Bregman response to upweighting ``index`` by ``epsilon``.

    Args:
        model: the trained network at ``theta_hat`` (not modified; a float64 copy is optimised).
        task: its :class:`~datatrace.Task` (outputs, loss, weight decay, default measurement).
        train: the training data the model was trained on.
        index: the training example whose weight changes.
        query: the query data.
        epsilon: weight added to ``l(z_index, theta)``; default ``-1/n`` (removal, the leave-one-out analogue).
        damping: the proximal strength ``damping/2 ||theta - theta_hat||^2`` (the same number as an influence
            function's ``damping`` for the Gauss-Newton curvature).
        measurement: ``(model, batch) -> (batch_size,)`` of the queries; default ``task.measurement``.
        params: parameters in scope (others stay at ``theta_hat``), as in :class:`~datatrace.InfluenceFunction`.
        max_iter, tolerance_grad, rounds: L-BFGS iterations per round, target ``max |grad|``, restarts.

    Returns:
        ``(n_query,)`` float64: ``f_q(theta_eps) - f_q(theta_hat)``. Divided by ``-n * epsilon`` it is comparable
        with leave-one-out influence scores ``score[:, index]``.
    """
    _check_model_task(model, task)
    source = as_data_source(train, "train")
    n = len(source)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -n <= int(index) < n:
        raise bad_value("index", index, f"expected one training example index in [0, {n})", "pass an int")
    index = int(index) % n
    if epsilon is None:
        epsilon = -1.0 / n
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise bad_value("epsilon", epsilon, "expected a number", "pass e.g. -1/n (removal)") from None
    if not math.isfinite(eps):
        raise bad_value("epsilon", epsilon, "expected a finite number", "pass e.g. -1/n (removal)")
    try:
        damp = float(damping)
    except (TypeError, ValueError):
        raise bad_value("damping", damping, "expected a number >= 0", "pass e.g. 0.0 or 1e-3") from None
    if not damp >= 0.0 or not math.isfinite(damp):
        raise bad_value("damping", damping, "expected a finite number >= 0", "pass e.g. 0.0 or 1e-3")
    if measurement is not None and not callable(measurement):
        raise bad_value("measurement", measurement, "expected a callable (model, batch) -> (b,)", "pass one")
    check_positive_int("max_iter", max_iter)
    check_positive_int("rounds", rounds)

    base = copy.deepcopy(model).to(torch.float64).eval()
    work = copy.deepcopy(base)
    first = next(base.parameters(), None)
    device = first.device if first is not None else None
    in_scope = select_parameters(work, params)
    for name, p in work.named_parameters():
        p.requires_grad_(name in in_scope)
    anchors = {name: p.detach().clone() for name, p in in_scope.items()}
    decay = {name: task.weight_decay_for(name) for name in in_scope}
    if damp == 0.0 and not any(decay.values()) and eps < 0:
        logger.warning(
            "pbrf_response: no weight decay and no damping, so nothing bounds the objective along directions "
            "where only the removed example's loss changes. Fix: pass damping > 0."
        )

    # per training batch: the reference outputs, losses and output gradients at theta_hat
    batches = []
    for _, raw in source.batches(batch_size=4096):
        batch = cast_batch(raw, torch.float64, device)
        with torch.no_grad():
            out_hat = task.outputs(base, batch).detach()
        o = out_hat.clone().requires_grad_(True)
        loss_hat = task.loss_from_outputs(o, batch)
        (grad_hat,) = torch.autograd.grad(loss_hat.sum(), o)
        batches.append((batch, out_hat, loss_hat.detach(), grad_hat.detach()))
    removed = cast_batch(source.get([index]), torch.float64, device)

    def objective() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for batch, out_hat, loss_hat, grad_hat in batches:
            out = task.outputs(work, batch)
            linear = ((grad_hat * (out - out_hat)).reshape(out.shape[0], -1)).sum(dim=1)
            total = total + (task.loss_from_outputs(out, batch) - loss_hat - linear).sum()
        total = total / n + eps * task.loss(work, removed).sum()
        for name, p in in_scope.items():
            sq = ((p - anchors[name]) ** 2).sum()
            total = total + 0.5 * (decay[name] + damp) * sq
        return total

    params_list = list(in_scope.values())
    reached = math.inf
    for r in range(rounds):
        # the first round searches lines (robust far from the optimum); later rounds polish with plain
        # quasi-Newton steps, which need gradients only: near the optimum the objective's value changes by less
        # than its rounding error, which stalls a line search, while its gradient is still accurate
        saved = [p.detach().clone() for p in params_list]
        optimizer = torch.optim.LBFGS(
            params_list,
            lr=1.0,
            max_iter=max_iter if r == 0 else min(max_iter, 100),
            tolerance_grad=tolerance_grad,
            tolerance_change=0.0,
            history_size=50,
            line_search_fn="strong_wolfe" if r == 0 else None,
        )

        def closure(optimizer: torch.optim.LBFGS = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            value = objective()
            value.backward()
            return value

        optimizer.step(closure)
        optimizer.zero_grad()
        value = objective()
        grads = torch.autograd.grad(value, params_list)
        now = max(float(g.abs().max()) for g in grads)
        if not now < reached:  # a polishing round that did not help is undone
            with torch.no_grad():
                for p, old in zip(params_list, saved):
                    p.copy_(old)
            if r > 0:
                break
        else:
            reached = now
        if reached <= 10 * tolerance_grad:
            break
    if reached > 10 * tolerance_grad:
        logger.warning(
            "pbrf_response: L-BFGS stopped at max |grad| = %.3g > tolerance %.3g; the response may be inexact.",
            reached,
            tolerance_grad,
        )
    fn = measurement if measurement is not None else task.measurement
    after = per_example(work, fn, query, "query")
    before = per_example(base, fn, query, "query")
    return after - before
