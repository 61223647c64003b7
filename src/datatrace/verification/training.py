"""Train a model to a tight minimum of exactly the objective that influence functions refer to.

Influence functions describe the minimiser of ``L(theta) = (1/n) sum_i l(z_i, theta) + sum_b lambda_b/2
||theta_b||^2`` (:mod:`datatrace.tasks`). :func:`fit_full_batch` minimises that same ``L`` with full-batch L-BFGS
and a strong-Wolfe line search, so that a model trained here, and every leave-one-out or subset retrain of it, is
at a stationary point to a stated gradient tolerance. It serves the demo, the benchmarks and the tests, and users
who want retraining ground truth for a small model.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from datatrace.data import DataLike, as_data_source, cast_batch
from datatrace.params import select_parameters
from datatrace.tasks import Task

logger = logging.getLogger(__name__)


def objective(model: nn.Module, task: Task, batches: list[tuple], n: int) -> torch.Tensor:
    """``L(theta)`` of :mod:`datatrace.tasks` for ``model`` on pre-built batches of ``n`` examples in total."""
    total = sum(task.loss(model, b).sum() for b in batches) / n
    for name, p in model.named_parameters():
        lam = task.weight_decay_for(name)
        if lam and p.requires_grad:
            total = total + 0.5 * lam * (p * p).sum()
    return total


def fit_full_batch(
    model: nn.Module,
    task: Task,
    data: DataLike,
    *,
    max_iter: int = 500,
    tolerance_grad: float = 1e-9,
    params: str | list[str] | None = None,
    copy_model: bool = True,
) -> nn.Module:
    """Minimise the task's training objective on ``data`` with full-batch L-BFGS, starting from ``model``.

    Warm-starting from an already trained model makes leave-one-out retraining fast: the new minimum is close.
    Returns the trained model (a copy unless ``copy_model=False``), in eval mode. Logs a warning when the
    gradient tolerance was not reached.
    """
    source = as_data_source(data, "data")
    model = copy.deepcopy(model) if copy_model else model
    dtype = next(model.parameters()).dtype
    batches = [
        cast_batch(b, dtype, next(model.parameters()).device) for _, b in source.batches(batch_size=4096)
    ]
    trainable = list(select_parameters(model, params).values())
    model.eval()
    optimizer = torch.optim.LBFGS(
        trainable,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(model, task, batches, len(source))
        loss.backward()
        return loss

    optimizer.step(closure)
    grad_norm = max(float(p.grad.abs().max()) for p in trainable if p.grad is not None)
    if grad_norm > 10 * tolerance_grad:
        logger.warning("L-BFGS stopped with max |grad| = %.3g > tolerance %.3g", grad_norm, tolerance_grad)
    for p in trainable:
        p.grad = None
    return model
