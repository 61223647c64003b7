"""Scores say whether they are in leave-one-out units (``metadata["units"]``) and count the queries whose scores
break the bound every loss obeys (``score >= -loss``: a retrained loss cannot be negative)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import datatrace
from datatrace.attributors.influence import (
    BELOW_MINUS_LOSS_WARN,
    LEAVE_ONE_OUT,
    RANK_ONLY,
    ROUTE_UNITS,
    count_below_minus_loss,
    route_units,
)
from datatrace.attributors.projected import ProjectedInfluence
from datatrace.curvature import ExactHessian
from datatrace.projection import RandomProjector


def fitted(problem, curvature="exact", **kw) -> datatrace.InfluenceFunction:
    return datatrace.InfluenceFunction(
        problem.model, problem.task, curvature=curvature, progress=False, **kw
    ).fit(problem.train)


def query_losses(problem) -> torch.Tensor:
    with torch.no_grad():
        return problem.task.loss(problem.model, problem.query)


class Inflated(ExactHessian):
    """The exact route with every solve multiplied by 1000: scores far too large, as an inflating route gives."""

    name = "inflated-exact"

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        return 1e3 * super().solve(vectors)


# -- the counter -------------------------------------------------------------------------------------------------------


def test_counter_counts_a_planted_violation_and_tolerates_rounding():
    losses = torch.tensor([0.5, 0.0, 1.0, 2.0], dtype=torch.float64)
    values = torch.zeros(4, 5, dtype=torch.float64)
    values[0, 2] = -0.6  # below -0.5: a violation
    values[1, 1] = -1e-9  # loss 0, a score a millionth of the largest |score| below 0: tolerated
    values[2, 3] = -0.99999999  # just above -1.0: allowed
    values[3, 0] = -1.999  # allowed
    values[3, 4] = -2.5  # a violation
    assert count_below_minus_loss(values, losses) == 2
    values[1, 0] = -1e-3  # loss 0 and a real negative score: a violation
    assert count_below_minus_loss(values, losses) == 3
    # an overshoot far below the scale of the scores (largest |score| 2.5) is not counted
    near_zero = torch.tensor([1e-8], dtype=torch.float64)
    assert count_below_minus_loss(torch.tensor([[-3e-8, 2.5]], dtype=torch.float64), near_zero) == 0
    assert count_below_minus_loss(torch.tensor([[-3e-8, 2.5e-3]], dtype=torch.float64), near_zero) == 1


def test_score_counts_the_planted_violations_and_warns(logreg_problem, caplog):
    inf = fitted(logreg_problem, curvature=Inflated())
    with caplog.at_level(logging.WARNING, logger="datatrace.attributors.influence"):
        scores = inf.score(logreg_problem.query)
    expected = count_below_minus_loss(scores.values, query_losses(logreg_problem))
    n_query = scores.values.shape[0]
    assert expected > BELOW_MINUS_LOSS_WARN * n_query  # the plant works
    assert scores.metadata["below_minus_loss"] == expected
    assert scores.metadata["below_minus_loss_fraction"] == pytest.approx(expected / n_query)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("below minus their own loss" in m and "damping" in m for m in warning)
    # a custom route datatrace does not know says so
    assert scores.metadata["units"] == "unknown"
    assert "inflated-exact" in scores.metadata["units_reason"]


def test_exact_route_on_a_convex_problem_has_no_score_below_minus_loss(logreg_problem, caplog):
    # cross-entropy: the first-order change of a query's loss is about (1 - p) times a logit change, and the loss
    # about (1 - p), so only a logit moving by more than one crosses the bound. (A squared error does not have
    # this margin: a query fitted almost exactly has a first-order change 2 r d that can pass -r^2 when the
    # prediction moves by more than r / 2, exact curvature or not.)
    problem = logreg_problem
    with caplog.at_level(logging.WARNING, logger="datatrace.attributors.influence"):
        scores = fitted(problem).score(problem.query)
    assert scores.metadata["below_minus_loss"] == 0
    assert scores.metadata["below_minus_loss_fraction"] == 0.0
    assert scores.metadata["units"] == LEAVE_ONE_OUT
    assert not [r for r in caplog.records if "below minus" in r.getMessage()]
    # the bound it checks is the real one: every score of this problem is at least -loss
    assert bool((scores.values >= -query_losses(problem)[:, None]).all())


def test_bound_is_not_claimed_for_another_measurement(logreg_problem):
    inf = fitted(logreg_problem)

    def logit_0(model, batch):
        return model(batch[0])[:, 0]

    scores = inf.score(logreg_problem.query, measurement=logit_0)
    assert "below_minus_loss" not in scores.metadata
    assert scores.metadata["units"] == LEAVE_ONE_OUT  # the route's units do not depend on the measurement


def test_bound_is_not_claimed_for_a_task_with_its_own_measurement(logreg_problem):
    class Margin(datatrace.ClassificationTask):
        def measurement(self, model, batch):
            return model(batch[0]).max(dim=1).values

    problem = logreg_problem
    inf = datatrace.InfluenceFunction(
        problem.model, Margin(weight_decay=1e-2), curvature="exact", progress=False
    ).fit(problem.train)
    assert "below_minus_loss" not in inf.score(problem.query).metadata


# -- the units of each route -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["kfac", "ekfac", "diagonal", "identity"])
def test_rank_only_routes_say_so_with_a_reason(logreg_problem, route):
    scores = fitted(logreg_problem, curvature=route).score(logreg_problem.query)
    assert scores.metadata["units"] == RANK_ONLY
    reason = scores.metadata["units_reason"]
    assert isinstance(reason, str) and len(reason) > 20
    assert isinstance(scores.metadata["below_minus_loss"], int)
    json.dumps(scores.metadata)  # stays JSON-serialisable (Scores.save)


@pytest.mark.parametrize("route", ["exact", "gauss-newton", "cg", "arnoldi"])
def test_leave_one_out_routes_say_so(logreg_problem, route):
    scores = fitted(logreg_problem, curvature=route).score(logreg_problem.query)
    assert scores.metadata["units"] == LEAVE_ONE_OUT
    assert scores.metadata["units_reason"]


def test_auto_takes_the_units_of_its_choice(logreg_problem):
    scores = fitted(logreg_problem, curvature="auto").score(logreg_problem.query)
    choice = scores.metadata["curvature"]["auto_choice"]
    assert choice in ("gauss-newton", "exact")  # a dense route on this small convex problem
    assert scores.metadata["units"] == route_units(choice, scores.metadata["curvature"])[0] == LEAVE_ONE_OUT
    assert route_units("auto", {"auto_choice": "ekfac"})[0] == RANK_ONLY


def test_block_diagonal_is_leave_one_out_only_with_one_block(mlp_problem):
    several = fitted(mlp_problem, curvature="block-diagonal").score(mlp_problem.query)
    assert several.metadata["curvature"]["num_blocks"] == 2
    assert several.metadata["units"] == RANK_ONLY
    one = fitted(mlp_problem, curvature="block-diagonal", params="2").score(mlp_problem.query)
    assert one.metadata["curvature"]["num_blocks"] == 1
    assert one.metadata["units"] == LEAVE_ONE_OUT


def test_every_registered_route_has_a_units_entry():
    assert set(datatrace.curvature.available()) - {"auto"} <= set(ROUTE_UNITS)


def test_projected_influence_states_its_units(logreg_problem):
    problem = logreg_problem
    for fisher, units in (("ggn", LEAVE_ONE_OUT), ("empirical", RANK_ONLY)):
        inf = ProjectedInfluence(
            problem.model,
            problem.task,
            projector=RandomProjector(8, random_state=0),
            fisher=fisher,
            dtype=torch.float64,
            progress=False,
        ).fit(problem.train)
        meta = inf.score(problem.query).metadata
        assert meta["units"] == units
        assert meta["units_reason"]


def test_arnoldi_reason_says_how_much_of_the_spectrum_it_keeps():
    units, reason = route_units("arnoldi", {"captured_fraction": 0.5, "exact": False})
    assert units == LEAVE_ONE_OUT and "50%" in reason
    assert "%" not in route_units("arnoldi", {"captured_fraction": 1.0, "exact": True})[1]
