"""damping='auto': minimal at a minimum of the objective, the effective-directions rule away from one."""

from __future__ import annotations

import pytest
import torch

from datatrace.curvature.base import AT_MINIMUM_RTOL, TrainingState
from datatrace.linalg import DOF_PER_OUTPUT, dof_damping, spectral_inverse


def _dof(e: torch.Tensor, lam: float) -> float:
    e = e.clamp(min=0)
    return float((e / (e + lam)).sum())


@pytest.mark.parametrize("target", [1.5, 10.0, 57.0])
def test_dof_damping_solves_the_effective_directions_equation(target: float) -> None:
    e = torch.logspace(-6, 2, 200, dtype=torch.float64)
    lam = dof_damping(e, target)
    assert _dof(e, lam) == pytest.approx(target, rel=1e-5)


def test_dof_damping_counts_multiplicities_and_ignores_negative_curvature() -> None:
    e = torch.tensor([4.0, 1.0, 0.25, -3.0], dtype=torch.float64)
    lam = dof_damping(e, 2.0, torch.tensor([1.0, 1.0, 10.0, 5.0], dtype=torch.float64))
    expanded = torch.cat([torch.tensor([4.0, 1.0]), torch.full((10,), 0.25)]).double()
    assert _dof(expanded, lam) == pytest.approx(2.0, rel=1e-5)


def test_dof_damping_is_zero_when_fewer_directions_than_the_target() -> None:
    assert dof_damping(torch.tensor([1.0, 2.0, 0.0]), 2.0) == 0.0
    assert dof_damping(torch.zeros(5), 1.0) == 0.0


def test_dof_damping_is_scale_free() -> None:
    e = torch.logspace(-4, 1, 100, dtype=torch.float64)
    assert dof_damping(1e3 * e, 20.0) == pytest.approx(1e3 * dof_damping(e, 20.0), rel=1e-5)


def test_training_state_at_a_minimum_keeps_the_minimal_damping() -> None:
    at_min = TrainingState(gradient_ratio=AT_MINIMUM_RTOL / 2, outputs=10)
    away = TrainingState(gradient_ratio=0.05, outputs=10)
    assert at_min.at_minimum and at_min.dof_target(5000) is None
    assert away.dof_target(5000) == DOF_PER_OUTPUT * 10
    assert away.dof_target(40) == 20.0  # at most half of the parameters


def test_spectral_inverse_uses_the_rule_only_with_a_target() -> None:
    e = torch.logspace(-5, 1, 300, dtype=torch.float64)
    _, minimal, info = spectral_inverse(e, "auto", "clip", None, "test")
    assert minimal == 0.0 and info["damping_rule"] == "at-minimum"
    inv, used, info = spectral_inverse(e, "auto", "clip", None, "test", dof_target=30.0)
    assert _dof(e, used) == pytest.approx(30.0, rel=1e-5) and info["damping_rule"] == "dof=30"
    torch.testing.assert_close(inv, 1.0 / (e + used))
    _, given, info = spectral_inverse(e, 0.5, "clip", None, "test", dof_target=30.0)
    assert given == 0.5 and info["damping_rule"] == "given"


def test_attributor_tells_the_route_how_far_from_a_minimum(logreg_problem, mlp_problem) -> None:
    """The float64 L-BFGS problems are at a minimum: 'auto' there is unchanged (0 on the convex one)."""
    from datatrace import InfluenceFunction

    p = logreg_problem
    inf = InfluenceFunction(p.model, p.task, curvature="exact", progress=False).fit(p.train)
    state = inf.curvature_.training_state
    assert state.at_minimum and state.outputs == 3
    assert inf.curvature_.info["damping"] == 0.0


def test_away_from_a_minimum_the_dense_route_keeps_the_target_directions(mlp_problem) -> None:
    import copy

    from datatrace import InfluenceFunction

    p = mlp_problem
    model = copy.deepcopy(p.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))  # well away from the minimum
    inf = InfluenceFunction(model, p.task, curvature="gauss-newton", progress=False).fit(p.train)
    route = inf.curvature_
    assert not route.training_state.at_minimum
    target = route.training_state.dof_target(len(route.evals_))
    assert _dof(route.evals_, route.damping_) == pytest.approx(target, rel=1e-4)


def test_projected_influence_uses_the_rule_away_from_a_minimum(mlp_problem) -> None:
    import copy

    from datatrace import ProjectedInfluence

    p = mlp_problem
    at_min = ProjectedInfluence(p.model, p.task, progress=False).fit(p.train)
    assert at_min.info["damping_rule"] == "at-minimum"
    model = copy.deepcopy(p.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    away = ProjectedInfluence(model, p.task, progress=False).fit(p.train)
    rule = away.info["damping_rule"]
    assert rule.startswith("dof=")
    target = float(rule.split("=")[1])
    assert _dof(torch.linalg.eigvalsh(away.curvature_matrix_), away.damping_) == pytest.approx(
        target, rel=1e-4
    )


def test_kfac_counts_locations_and_stops_at_all_parameters(cnn_problem) -> None:
    """Away from a minimum K-FAC/EK-FAC keep 75 directions per output column and location (the convolution's 16
    pixels: 75 x 2 x 16 = 2,400), stopped at the parameters in scope (58 here: no damping), where the dense routes
    stop at half of them."""
    import copy

    from datatrace import InfluenceFunction
    from datatrace.curvature.kfac import KFAC_DOF_MAX_FRACTION, KFAC_DOF_PER_OUTPUT

    p = cnn_problem
    model = copy.deepcopy(p.model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(
                0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0), dtype=param.dtype)
            )
    for route in ("kfac", "ekfac"):
        inf = InfluenceFunction(model, p.task, curvature=route, progress=False).fit(p.train)
        state, info = inf.curvature_.training_state, inf.curvature_.info
        assert not state.at_minimum and state.outputs == 2
        locations = max(layer["locations_per_example"] for layer in info["layers"].values())
        assert locations == 16  # the 4 x 4 output pixels of the 3 x 3 convolution on 6 x 6 images
        p_scope = inf.fmodel_.num_params
        assert KFAC_DOF_PER_OUTPUT * 2 * locations > p_scope
        assert (
            info["damping_rule"] == f"dof={p_scope * KFAC_DOF_MAX_FRACTION:g}" and info["damping_min"] == 0.0
        )
        assert state.dof_target(p_scope, KFAC_DOF_PER_OUTPUT, 2 * 16) == p_scope / 2  # the dense routes' stop
