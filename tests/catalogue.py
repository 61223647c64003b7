"""The shared catalogue of small test problems: float64 models trained to a tight minimum of the same objective
the attributors assume, so exact oracles (dense Hessian, closed forms) apply.

Each builder is cached: a test gets the same trained model every time it asks (treat it as read-only; deep-copy
before changing it). ``conftest.py`` exposes them as fixtures (``logreg_problem``, ``mlp_problem``,
``cnn_problem``, ``regression_problem``) and as the parametrised ``problem`` fixture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from datatrace import ClassificationTask, RegressionTask, Task
from datatrace.verification.training import fit_full_batch


@dataclass(frozen=True)
class Problem:
    """A trained model, its task and data: ``train`` and ``query`` are ``(X, y)`` tuples of float64 tensors."""

    name: str
    model: nn.Module
    task: Task
    train: tuple[torch.Tensor, torch.Tensor]
    query: tuple[torch.Tensor, torch.Tensor]
    convex: bool


def _blobs(n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 1.5
    return centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


def _split(data: tuple[torch.Tensor, torch.Tensor], n_query: int) -> tuple[tuple, tuple]:
    X, y = data
    return (X[n_query:], y[n_query:]), (X[:n_query], y[:n_query])


@functools.cache
def logistic_regression() -> Problem:
    """Multinomial logistic regression, 4 features, 3 classes, 48 training / 8 query examples (convex)."""
    train, query = _split(_blobs(56, 4, 3, seed=0), 8)
    task = ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(0)
    model = fit_full_batch(nn.Linear(4, 3).double(), task, train, max_iter=500, tolerance_grad=1e-9)
    return Problem("logreg", model, task, train, query, convex=True)


@functools.cache
def mlp() -> Problem:
    """A tanh MLP 4-6-3 (51 parameters, non-convex), 48 training / 8 query examples."""
    train, query = _split(_blobs(56, 4, 3, seed=1), 8)
    task = ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = fit_full_batch(net, task, train, max_iter=1000, tolerance_grad=1e-8)
    return Problem("mlp", model, task, train, query, convex=False)


@functools.cache
def cnn() -> Problem:
    """A small CNN on 1x6x6 images (Conv2d 1->2, 3x3, tanh, Linear 32->2), 40 training / 6 query examples."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(46, 1, 6, 6, generator=g, dtype=torch.float64)
    y = (X[:, 0, :3].sum(dim=(1, 2)) > X[:, 0, 3:].sum(dim=(1, 2))).long()
    train, query = _split((X, y), 6)
    task = ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 2)).double()
    model = fit_full_batch(net, task, train, max_iter=1000, tolerance_grad=1e-8)
    return Problem("cnn", model, task, train, query, convex=False)


@functools.cache
def regression() -> Problem:
    """Ridge-like linear regression, 3 features, one target column, 40 training / 6 query examples (convex)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(46, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(
        46, 1, generator=g, dtype=torch.float64
    )
    train, query = _split((X, y), 6)
    task = RegressionTask(weight_decay=1e-2)
    torch.manual_seed(3)
    model = fit_full_batch(nn.Linear(3, 1).double(), task, train, max_iter=500, tolerance_grad=1e-9)
    return Problem("regression", model, task, train, query, convex=True)


BUILDERS = {"logreg": logistic_regression, "mlp": mlp, "cnn": cnn, "regression": regression}
