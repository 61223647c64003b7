"""Frozen parameters (``requires_grad=False``, e.g. a pretrained encoder under a fine-tuned head) are outside the
scope of influence by themselves: held at their values, as in training, with the scores of naming the trainable
parameters explicitly (``params=``), on every route."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import datatrace
from datatrace.curvature.kfac import EKFAC

torch.set_num_threads(1)


@pytest.fixture
def frozen_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    )
    model = model.double()
    for parameter in [*model[0].parameters(), *model[2].parameters()]:  # a frozen "encoder"
        parameter.requires_grad_(False)
    return model, X, y


TRAINABLE = ["3.weight", "3.bias", "5.weight", "5.bias"]

ROUTES = {
    "auto": lambda m, t, p: datatrace.InfluenceFunction(m, t, params=p, progress=False),
    "cg": lambda m, t, p: datatrace.InfluenceFunction(m, t, curvature="cg", params=p, progress=False),
    "ekfac": lambda m, t, p: datatrace.InfluenceFunction(m, t, curvature=EKFAC(), params=p, progress=False),
    "factorized": lambda m, t, p: datatrace.ProjectedInfluence(
        m, t, projector=datatrace.FactorizedProjector(), params=p, progress=False
    ),
    "random": lambda m, t, p: datatrace.ProjectedInfluence(m, t, params=p, progress=False),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_frozen_parameters_are_outside_the_default_scope(route, frozen_problem):
    model, X, y = frozen_problem
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    default = ROUTES[route](model, task, None).fit((X, y))
    assert list(default.fmodel_.space.names) == TRAINABLE  # the frozen Linear and LayerNorm: not in scope
    assert not getattr(default, "params_left_out_", {})  # ... and not "left out" either: never in it
    explicit = ROUTES[route](model, task, TRAINABLE).fit((X, y))
    expected = explicit.score((X[:5], y[:5])).values
    torch.testing.assert_close(default.score((X[:5], y[:5])).values, expected)
    assert torch.isfinite(expected).all() and expected.abs().amax() > 0
    assert all(not p.requires_grad for p in model[0].parameters())  # the user's model is untouched


def test_a_model_with_every_parameter_frozen_says_so(frozen_problem):
    model, X, y = frozen_problem
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters.*Fix"):
        datatrace.InfluenceFunction(model, datatrace.ClassificationTask(), progress=False).fit((X, y))
