"""verify(): the method choice, the agreement against retraining and the verdict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import datatrace
from datatrace.verification import fit_full_batch, verify
from datatrace.verification.verify import VERDICTS


def _convex_train_fn(problem):
    def train_fn(data, seed=0):
        return fit_full_batch(problem.model, problem.task, data, max_iter=300, tolerance_grad=1e-10)

    return train_fn


class _FarFromMinimum:
    """An MLP trained by 30 plain gradient steps from a seeded init: deterministic, nowhere near a minimum."""

    def __init__(self, task, fail_on_call: int | None = None):
        self.task = task
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, data, seed=0):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated interruption")
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        for _ in range(30):
            optimizer.zero_grad()
            self.task.loss(net, data).mean().backward()
            optimizer.step()
        return net


def test_convex_model_is_trustworthy(regression_problem):
    p = regression_problem
    influence = datatrace.InfluenceFunction(p.model, p.task, progress=False).fit(p.train)
    result = verify(influence, p.train, _convex_train_fn(p), p.query, n_retrains=10, progress=False)
    assert result.method == "leave-one-out" and "two seeds" in result.reason
    assert result.verdict == "trustworthy", result.explanation
    assert result.agreement["mean_pearson"] >= 0.95
    assert result.n_retrains == 10 + 3
    assert result.estimated.shape == result.actual.shape == (len(p.query[0]), 10)
    assert result.to_dict()["verdict"] == "trustworthy"


def test_model_far_from_a_minimum_gets_a_worse_verdict(mlp_problem):
    p = mlp_problem
    train_fn = _FarFromMinimum(p.task)
    far = train_fn(p.train)
    influence = datatrace.InfluenceFunction(far, p.task, curvature="exact", progress=False).fit(p.train)
    result = verify(influence, p.train, train_fn, p.query, n_retrains=12, progress=False)
    assert result.verdict in ("use rankings only", "not trustworthy here"), result.explanation
    if result.verdict == "not trustworthy here":
        assert "What to try" in result.explanation


def test_subsets_give_lds_with_its_ceiling(mlp_problem):
    p = mlp_problem
    train_fn = _FarFromMinimum(p.task)
    influence = datatrace.InfluenceFunction(train_fn(p.train), p.task, progress=False).fit(p.train)
    result = verify(influence, p.train, train_fn, p.query, method="subsets", n_retrains=8, progress=False)
    assert result.method == "subsets" and result.verdict in VERDICTS
    assert {"lds", "noise_ceiling", "correlation_ceiling"} <= set(result.agreement)
    assert result.n_retrains == 8 and result.truth.outputs.shape == (4, 2, len(p.query[0]))


def test_interrupted_verification_resumes(mlp_problem, tmp_path):
    p = mlp_problem
    scores = datatrace.InfluenceFunction(_FarFromMinimum(p.task)(p.train), p.task, progress=False).fit(
        p.train
    )
    scores = scores.score(p.query)
    crashing = _FarFromMinimum(p.task, fail_on_call=7)
    kwargs = dict(scores=scores, method="leave-one-out", n_retrains=8, cache_dir=tmp_path, progress=False)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        verify(_Scored(p.task), p.train, crashing, p.query, **kwargs)
    resumed = _FarFromMinimum(p.task)
    result = verify(_Scored(p.task), p.train, resumed, p.query, **kwargs)
    assert resumed.calls == (8 + 1) - 6  # the six finished retrains were reused
    assert result.n_retrains == 8 + 1


class _Scored:
    """A stand-in attributor for precomputed scores: only its task is read."""

    def __init__(self, task):
        self.task = task

    def score(self, query):
        raise AssertionError("scores were passed: score() must not be called")


def test_bad_arguments_name_the_fix(regression_problem):
    p = regression_problem
    influence = datatrace.InfluenceFunction(p.model, p.task, progress=False).fit(p.train)
    with pytest.raises(ValueError, match=r"method='loo'.*Fix"):
        verify(influence, p.train, _convex_train_fn(p), p.query, method="loo")
    with pytest.raises(ValueError, match=r"attributor=.*score\(query\).*Fix"):
        verify(object(), p.train, _convex_train_fn(p), p.query)
    with pytest.raises(ValueError, match=r"train=.*columns.*Fix"):
        verify(influence, (p.train[0][:5], p.train[1][:5]), _convex_train_fn(p), p.query)
