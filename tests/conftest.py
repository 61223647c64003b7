"""Shared fixtures: tiny float64 problems with known structure (exact oracles need float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import catalogue


@pytest.fixture
def regression_data():
    """``(X, y)``: 40 examples, 3 features, one float64 target column (linear signal plus noise)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(
        40, 1, generator=g, dtype=torch.float64
    )
    return X, y


@pytest.fixture
def classification_data():
    """``(X, y)``: 60 examples, 3 features, 3 overlapping classes (integer labels)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(60) % 3
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    X = centres[y] * 1.5 + torch.randn(60, 3, generator=g, dtype=torch.float64)
    return X, y


@pytest.fixture
def make_mlp():
    """Factory: a float64 ``Linear(d, h) -> Tanh -> Linear(h, k)`` with seeded weights (names ``0.*``, ``2.*``)."""

    def make(d: int = 3, h: int = 4, k: int = 3, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k)).double()

    return make


@pytest.fixture
def make_linear():
    """Factory: a float64 ``nn.Linear(d, k)`` with seeded weights."""

    def make(d: int = 3, k: int = 1, bias: bool = True, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(d, k, bias=bias).double()

    return make


# ---------------------------------------------------------------------------------------------------------------
# The shared catalogue (tests/catalogue.py): trained once per session, reused by every test that asks
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def logreg_problem():
    return catalogue.logistic_regression()


@pytest.fixture(scope="session")
def mlp_problem():
    return catalogue.mlp()


@pytest.fixture(scope="session")
def cnn_problem():
    return catalogue.cnn()


@pytest.fixture(scope="session")
def regression_problem():
    return catalogue.regression()


@pytest.fixture(scope="session", params=sorted(catalogue.BUILDERS))
def problem(request):
    """Every problem of the catalogue in turn."""
    return catalogue.BUILDERS[request.param]()
