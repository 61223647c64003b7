"""Training functions for retraining ground truth: to a tight minimum, or the way people train.

Influence functions describe the minimiser of ``L(theta) = (1/n) sum_i l(z_i, theta) + sum_b lambda_b/2
||theta_b||^2`` (:mod:`datatrace.tasks`).

* :func:`fit_full_batch` minimises that same ``L`` with full-batch L-BFGS and a strong-Wolfe line search, so that a
  model trained here, and every leave-one-out or subset retrain of it, is at a stationary point to a stated
  gradient tolerance (the exactness oracles of the tests and the convex benchmarks).
* :func:`fit_minibatch` is the recipe people actually use: Adam, AdamW or SGD with momentum on shuffled minibatches
  for a fixed number of epochs, in the model's dtype (float32 usually), with dropout and BatchNorm in train mode.
  It is deterministic given ``seed`` (the initialisation when ``init`` is given, the shuffling and the dropout
  masks), so it serves as ``train_fn`` of :mod:`datatrace.verification.retrain` (subsets averaged over seeds give
  the LDS ground truth of Park et al. 2023).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from datatrace.data import DataLike, as_data_source, cast_batch
from datatrace.errors import check_choice, check_nonnegative_float, check_positive_int
from datatrace.params import select_parameters
from datatrace.run.recording import Recorder
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


OPTIMIZERS = ("adam", "adamw", "sgd")


def fit_minibatch(
    model: nn.Module,
    task: Task,
    data: DataLike,
    *,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    init: Callable[[nn.Module], None] | None = None,
    copy_model: bool = True,
    record_to: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 100,
    gradient_dim: int | None = None,
) -> nn.Module:
    """Train ``model`` on ``data`` with minibatches for a fixed budget, deterministically given ``seed``.

    Each step minimises the minibatch mean of the task's loss plus the task's L2 term ``sum_b lambda_b/2
    ||theta_b||^2`` (the same objective influence functions see), with ``optimizer``: ``"adam"``
    (``torch.optim.Adam``), ``"adamw"`` (decoupled ``weight_decay``, an extra decay influence functions do not
    see) or ``"sgd"`` (with ``momentum``). Every epoch visits the examples in a fresh random order drawn from
    ``seed``; dropout masks come from the same seed. ``init(model)``, when given, re-initialises the parameters
    under that seed first (a retrain from scratch); otherwise training continues from ``model``'s parameters.
    Returns the trained model (a copy unless ``copy_model=False``) in eval mode.

    ``record_to``: a folder where a :class:`datatrace.Recorder` records the run (for
    :class:`~datatrace.attributors.metagradient.Metagradient` and single-model ground truth), with a state saved
    every ``checkpoint_every`` steps, and with ``gradient_dim`` the projected per-example gradients of every step
    (for :class:`~datatrace.attributors.tracin_recorded.RecordedTracIn`). The recorder seeds every step itself (dropout masks then differ from an
    unrecorded run with the same ``seed``; the order of the examples does not).
    """
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    lr = check_nonnegative_float("lr", lr)
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
    source = as_data_source(data, "data")
    model = copy.deepcopy(model) if copy_model else model
    first = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init is not None:
            init(model)
        order_rng = torch.Generator().manual_seed(seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        decays = [(p, task.weight_decay_for(name)) for name, p in model.named_parameters() if p.requires_grad]
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(trainable, lr=lr, momentum=momentum)
        elif optimizer == "adamw":
            opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.Adam(trainable, lr=lr)
        model.train()
        n = len(source)
        recorder = None
        if record_to is not None:
            recorder = Recorder(
                record_to,
                model,
                opt,
                n_train=n,
                seed=seed,
                checkpoint_every=checkpoint_every,
                overwrite=True,
                task=task,
                gradient_dim=gradient_dim,
            )
        for _ in range(epochs):
            perm = torch.randperm(n, generator=order_rng)
            for start in range(0, n, batch_size):
                batch = cast_batch(source.get(perm[start : start + batch_size]), first.dtype, first.device)
                if recorder is not None:
                    recorder.begin_step(perm[start : start + batch_size], batch)
                loss = task.loss(model, batch).mean()
                for p, lam in decays:
                    if lam:
                        loss = loss + 0.5 * lam * (p * p).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if recorder is not None:
            recorder.finish()
    model.eval()
    for p in trainable:
        p.grad = None
    return model
