"""What ``debug_data`` ranks the training examples by (issue 10, item 5): the training loss by default, because on
realistic networks no self-influence route found more flipped labels (``benchmarks/bench_mislabel.py``); self-
influence on request; the result names its measure."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from datatrace import ClassificationTask, InfluenceFunction
from datatrace.apps import debug_data, detection_summary
from datatrace.apps.debug import DEFAULT_RANKING, RANKINGS, DebugResult
from datatrace.verification.metrics import detection_curve
from datatrace.verification.training import fit_minibatch

N, FLIPS = 120, (3, 17, 30, 58, 71, 99)


@pytest.fixture(autouse=True)
def _quiet(caplog):
    """An Adam-trained network is not at a minimum: the attributor says so; these tests check rankings."""
    caplog.set_level(logging.ERROR, logger="datatrace.attributors.influence")


@pytest.fixture(scope="module")
def planted():
    """Four well-separated Gaussian classes in 5-D, six labels flipped on purpose, a small MLP trained as people
    train (float32, Adam, minibatches of 16, weight decay in the task), exact influence on it."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % 4
    X = (torch.eye(4, 5)[y] * 5.0 + torch.randn(N, 5, generator=g)).float()
    noisy = y.clone()
    flipped = np.zeros(N, dtype=bool)
    for k, i in enumerate(FLIPS):
        noisy[i] = (y[i] + 1 + k % 3) % 4
        flipped[i] = True
    task = ClassificationTask(weight_decay=1e-3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    model = fit_minibatch(net, task, (X, noisy), epochs=30, batch_size=16, lr=1e-2, seed=0)
    inf = InfluenceFunction(model, task, curvature="exact", progress=False).fit((X, noisy))
    return {"inf": inf, "flipped": flipped, "train": (X, noisy)}


def test_default_ranks_by_the_training_loss_and_puts_the_planted_flips_first(planted):
    result = debug_data(planted["inf"])
    assert DEFAULT_RANKING == "training_loss" and result.ranked_by == "training_loss"
    assert result.ranking_meaning == RANKINGS["training_loss"] and "loss" in result.ranking_meaning
    assert np.all(np.diff(result.training_loss[result.suspicious_order]) <= 0)
    assert set(result.suspicious_order[: len(FLIPS)].tolist()) == set(FLIPS)
    # self-influence is still computed and kept, with its own order
    np.testing.assert_allclose(result.self_influence, planted["inf"].self_influence().numpy())
    assert np.all(np.diff(result.self_influence[result.order("self_influence")]) <= 0)
    assert result.order("training_loss").tolist() == result.suspicious_order.tolist()


def test_rank_by_self_influence_on_request(planted):
    result = debug_data(planted["inf"], rank_by="self_influence")
    assert result.ranked_by == "self_influence" and "Koh & Liang" in result.ranking_meaning
    assert np.all(np.diff(result.self_influence[result.suspicious_order]) <= 0)
    summary = detection_summary(result, planted["flipped"], fractions=(0.05, 0.1))
    assert summary["ranked_by"] == "self_influence"
    assert detection_summary(debug_data(planted["inf"]), planted["flipped"])["ranked_by"] == "training_loss"


def test_on_an_adam_trained_network_the_loss_finds_at_least_as_many_flips(planted):
    """The benchmark's finding in miniature: the default ranking finds every planted flip in its top 5%, and no
    fewer than self-influence does."""
    result = debug_data(planted["inf"])
    by_loss = detection_curve(result.training_loss, planted["flipped"])
    by_self = detection_curve(result.self_influence, planted["flipped"])
    assert by_loss.found_at(0.05) == 1.0
    assert by_loss.found_at(0.05) >= by_self.found_at(0.05) and by_loss.auc >= by_self.auc


def test_bad_rankings_name_the_argument(planted):
    with pytest.raises(ValueError, match=r"rank_by='gradient_norm' is not allowed.*training_loss"):
        debug_data(planted["inf"], rank_by="gradient_norm")
    result = debug_data(planted["inf"])
    with pytest.raises(ValueError, match=r"by='loss' is not allowed"):
        result.order("loss")
    with pytest.raises(ValueError, match=r"ranked_by='margin' is not allowed"):
        DebugResult(
            self_influence=result.self_influence,
            validation_influence=None,
            training_loss=result.training_loss,
            suspicious_order=result.suspicious_order,
            harmful_order=None,
            ranked_by="margin",
        )


def test_leave_one_out_loss_is_the_loss_plus_self_influence(planted):
    """``l(z_i, theta_{-i}) ~ l_i + s_i`` to first order: the ranking "loo_loss" orders by that sum."""
    result = debug_data(planted["inf"], rank_by="loo_loss")
    assert result.ranked_by == "loo_loss" and "leave-one-out" in result.ranking_meaning
    loo = result.training_loss + result.self_influence
    np.testing.assert_array_equal(result.values("loo_loss"), loo)
    assert np.all(np.diff(loo[result.suspicious_order]) <= 0)
    assert set(result.suspicious_order[: len(FLIPS)].tolist()) == set(FLIPS)
    summary = detection_summary(result, planted["flipped"])
    assert summary["ranked_by"] == "loo_loss" and "loo_loss" in summary["rankings"]
    assert "loo_loss" not in detection_summary(debug_data(planted["inf"]), planted["flipped"])["rankings"]
