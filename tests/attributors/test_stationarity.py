"""The stationarity warning (attributors.base.check_stationary): quiet on a model trained as people train (Adam on
minibatches, which stops at its noise floor), loud on a model whose examples still agree on a descent direction."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import datatrace
from datatrace.attributors.base import STATIONARITY_TOLERANCE, check_stationary
from datatrace.verification.training import fit_minibatch


@pytest.fixture(scope="module")
def adam_digits():
    """A digits MLP 64-32-10 trained like the benchmark catalogue's mlp-small: float32, Adam, batches of 32."""
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:300] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:300], dtype=torch.int64)
    task = datatrace.ClassificationTask(weight_decay=1e-4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model = fit_minibatch(model, task, (X, y), epochs=30, batch_size=32, lr=1e-3, optimizer="adam", seed=0)
    return model, task, (X, y)


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "minimum" in r.getMessage()
    ]


def _fit(model, task, data, caplog) -> datatrace.InfluenceFunction:
    inf = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False)
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        return inf.fit(data)


def test_an_adam_trained_model_does_not_warn(adam_digits, caplog):
    model, task, data = adam_digits
    inf = _fit(model, task, data, caplog)
    assert _warnings(caplog) == []
    assert inf.gradient_norm_ > 1e-3  # not at a minimum in the strict sense: the minibatch noise floor


def test_a_model_far_from_its_minimum_warns(adam_digits, caplog):
    """The same model with one output's bias raised by 5: every example's gradient asks to lower it."""
    model, task, data = adam_digits
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted[2].bias[3] += 5.0
    inf = _fit(shifted, task, data, caplog)
    (message,) = _warnings(caplog)
    assert "not at a minimum" in message and f"{inf.gradient_norm_:.3g}" in message
    assert f"below {STATIONARITY_TOLERANCE:g}" in message


@pytest.mark.parametrize(
    ("relative", "warns"), [(0.9 * STATIONARITY_TOLERANCE, False), (1.1 * STATIONARITY_TOLERANCE, True)]
)
def test_the_threshold_on_both_sides(relative, warns, caplog):
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        assert check_stationary(
            relative * 2.0, 2.0, "||grad L||", "per-example gradient norm"
        ) == pytest.approx(relative)
    assert bool(_warnings(caplog)) is warns
