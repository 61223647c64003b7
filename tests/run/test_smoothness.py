"""Non-smooth operations of a recorded run: found by name (modules and functional calls), reported by the
metagradient; and why it matters: a ReLU run is not differentiable in the data weights, a smooth one is."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datatrace
from datatrace.attributors.metagradient import Metagradient
from datatrace.run.recording import Recording
from datatrace.run.replay import Replay
from datatrace.run.smoothness import non_smooth_operations
from datatrace.verification import retrain
from datatrace.verification.training import fit_minibatch


class FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


def test_non_smooth_operations_are_found_in_modules_and_functional_calls() -> None:
    x = torch.randn(3, 4)
    assert non_smooth_operations(lambda: FunctionalRelu()(x)) == ["relu"]
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(), nn.MaxPool2d(2))
    assert non_smooth_operations(lambda: pooled(torch.randn(2, 1, 4, 4))) == ["leaky_relu", "max_pool2d"]
    smooth = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Tanh(), nn.SiLU(), nn.Softplus(), nn.Linear(6, 2))
    assert non_smooth_operations(lambda: smooth(x)) == []


def _digits_like(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] - 0.5 * X[:, 2] + 0.8 * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    return X, y


def _record(tmp_path, activation: type[nn.Module], name: str) -> tuple[nn.Module, Recording, tuple]:
    train = _digits_like()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), activation(), nn.Linear(16, 2)).double()
    task = datatrace.ClassificationTask()
    fit_minibatch(model, task, train, epochs=8, batch_size=10, lr=0.01, seed=0, record_to=tmp_path / name)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(4, 16), activation(), nn.Linear(16, 2)).double()
    return fresh, Recording(tmp_path / name), train


def test_metagradient_reports_non_smooth_operations(tmp_path, caplog) -> None:
    task = datatrace.ClassificationTask()
    model, recording, train = _record(tmp_path, nn.ReLU, "relu")
    with caplog.at_level(logging.WARNING, logger="datatrace.attributors.metagradient"):
        attributor = Metagradient(model, task, recording, progress=False).fit(train)
    assert "relu" in caplog.text and "not a differentiable function" in caplog.text
    scores = attributor.score((train[0][:2], train[1][:2]))
    assert scores.metadata["non_smooth_operations"] == ["relu"]
    caplog.clear()
    model, recording, train = _record(tmp_path, nn.Tanh, "tanh")
    with caplog.at_level(logging.WARNING, logger="datatrace.attributors.metagradient"):
        attributor = Metagradient(model, task, recording, progress=False).fit(train)
    assert caplog.text == ""
    assert attributor.score((train[0][:2], train[1][:2])).metadata["non_smooth_operations"] == []


@pytest.mark.parametrize("alpha", [1e-3, 3e-2])
def test_a_smooth_run_is_linear_in_its_data_weights_at_removal_scale(tmp_path, alpha) -> None:
    """Adam on a tanh network (float64): reweighting a quarter of the examples by ``1 - alpha`` changes the query
    losses as the metagradient predicts, to second order in ``alpha``."""
    task = datatrace.ClassificationTask()
    model, recording, train = _record(tmp_path, nn.Tanh, "tanh")
    query = _digits_like(4, seed=1)
    scores = Metagradient(model, task, recording, progress=False).fit(train).score(query).values
    removed = torch.zeros(len(train[0]), dtype=torch.float64)
    removed[torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(3))[:15]] = 1.0
    replay = Replay(model, task, recording, train)
    evaluate = retrain.evaluator(task, query)
    before = evaluate(replay.model_at(replay.run(replay.initial(), replay.n_steps)))
    after = evaluate(replay.model_at(replay.run(replay.initial(), replay.n_steps, 1.0 - alpha * removed)))
    predicted = (
        alpha * (scores @ removed).numpy()
    )  # score ~ f(without i) - f, here i is a fraction alpha removed
    actual = after - before
    assert abs(actual - predicted).max() <= 0.02 * abs(actual).max() + 1e-12


def test_a_forward_pass_that_cannot_be_probed_leaves_smoothness_unknown(tmp_path, monkeypatch) -> None:
    import datatrace.run.replay as replay_module

    def fails(forward):
        raise RuntimeError("no torch function mode here")

    monkeypatch.setattr(replay_module, "non_smooth_operations", fails)
    model, recording, train = _record(tmp_path, nn.ReLU, "relu")
    attributor = Metagradient(model, datatrace.ClassificationTask(), recording, progress=False).fit(train)
    assert attributor.score((train[0][:2], train[1][:2])).metadata["non_smooth_operations"] is None
