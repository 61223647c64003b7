"""K-FAC/EK-FAC with the default scope (params=None) cover the layers they support and name the parameters they
leave out (datatrace.capture.scope); curvature='auto' may take EK-FAC on that part when nothing on all parameters
fits its time budget."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import datatrace
from datatrace.capture.scope import supported_scope
from datatrace.curvature.auto import AutoCurvature
from datatrace.data import as_data_source
from datatrace.gradients.functional import FunctionalModel, prepare_model


class TinyEncoder(nn.Module):
    """Embedding, a transformer encoder layer (attention with a packed input projection and an out_proj used
    functionally), LayerNorm and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.enc(self.emb(x))).mean(1))


class FunctionalWeight(nn.Module):
    """``side``'s weight is used with F.linear, so its forward never runs (like attention's out_proj); the
    LayerNorm is outside the supported layers, which is what makes the scope look at which forwards run."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.side = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.body(x)))
        return self.head(h + 0.1 * nn.functional.linear(h, self.side.weight, self.side.bias))


LEFT_OUT = {
    "emb.weight",
    "enc.self_attn.in_proj_weight",
    "enc.self_attn.in_proj_bias",
    "enc.self_attn.out_proj.weight",
    "enc.self_attn.out_proj.bias",
    "enc.norm1.weight",
    "enc.norm1.bias",
    "enc.norm2.weight",
    "enc.norm2.bias",
    "norm.weight",
    "norm.bias",
}


@pytest.fixture(scope="module")
def encoder_problem():
    torch.manual_seed(0)
    model = TinyEncoder().double()
    X = torch.randint(0, 20, (40, 5))
    y = torch.arange(40) % 3
    return model, datatrace.ClassificationTask(weight_decay=1e-3), (X, y)


def test_scope_covers_running_supported_layers_and_names_the_rest(encoder_problem):
    model, task, train = encoder_problem
    fmodel = FunctionalModel(prepare_model(model, None), task)
    scope = supported_scope(fmodel, as_data_source(train), "EK-FAC", "fix")
    # linear1/linear2 run in the real pass even though eval mode without gradients would take the fast path
    assert set(scope.covered) == {
        "enc.linear1.weight",
        "enc.linear1.bias",
        "enc.linear2.weight",
        "enc.linear2.bias",
        "head.weight",
        "head.bias",
    }
    assert set(scope.left_out) == LEFT_OUT
    assert "forward never runs" in scope.left_out["enc.self_attn.out_proj.weight"]
    assert "LayerNorm" in scope.left_out["norm.weight"]
    assert "Embedding" in scope.left_out["emb.weight"]
    assert list(scope.covered) == [n for n in fmodel.space.names if n in scope.covered]  # model order


def test_functionally_used_linear_is_left_out():
    torch.manual_seed(1)
    model = FunctionalWeight().double()
    X, y = torch.randn(30, 4, dtype=torch.float64), torch.arange(30) % 2
    fmodel = FunctionalModel(prepare_model(model, None), datatrace.ClassificationTask())
    scope = supported_scope(fmodel, as_data_source((X, y)), "EK-FAC", "fix")
    assert set(scope.left_out) == {"side.weight", "side.bias", "norm.weight", "norm.bias"}
    assert "forward never runs" in scope.left_out["side.weight"]
    assert scope.covered == ("body.weight", "body.bias", "head.weight", "head.bias")


def test_a_model_of_supported_layers_only_is_taken_whole_without_a_forward_pass():
    calls = []
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model.register_forward_hook(lambda *_: calls.append(1))
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.arange(10) % 2
    fmodel = FunctionalModel(model, datatrace.ClassificationTask())
    scope = supported_scope(fmodel, as_data_source((X, y)), "EK-FAC", "fix")
    assert scope.covered == fmodel.space.names and scope.left_out == {}
    assert calls == []


@pytest.mark.parametrize("route", ["ekfac", "kfac"])
def test_default_scope_equals_the_explicit_supported_params(encoder_problem, route, caplog):
    model, task, train = encoder_problem
    query = (train[0][:3], train[1][:3])
    with caplog.at_level(logging.INFO, logger="datatrace"):
        default = datatrace.InfluenceFunction(model, task, curvature=route, progress=False).fit(train)
    scores = default.score(query)
    assert set(scores.metadata["params_left_out"]) == LEFT_OUT
    assert any("11 parameter tensors left out" in r.getMessage() for r in caplog.records)
    covered = [n for n, _ in model.named_parameters() if n not in LEFT_OUT]
    assert scores.metadata["num_params"] == sum(dict(model.named_parameters())[n].numel() for n in covered)
    explicit = datatrace.InfluenceFunction(model, task, curvature=route, params=covered, progress=False).fit(
        train
    )
    torch.testing.assert_close(explicit.score(query).values, scores.values)


def test_explicit_params_outside_supported_layers_still_refused(encoder_problem):
    model, task, train = encoder_problem
    with pytest.raises(ValueError, match=r"norm\.weight"):
        datatrace.InfluenceFunction(
            model, task, curvature="ekfac", params=["norm", "head"], progress=False
        ).fit(train)


def test_model_without_a_running_supported_layer_is_refused():
    model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten()).double()
    X, y = torch.randint(0, 10, (20, 1)), torch.arange(20) % 3
    with pytest.raises(ValueError, match="has none"):
        datatrace.InfluenceFunction(
            model, datatrace.ClassificationTask(), curvature="ekfac", progress=False
        ).fit((X, y))


def test_dense_routes_keep_every_parameter(encoder_problem):
    model, task, train = encoder_problem
    inf = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", progress=False).fit(train)
    meta = inf.score((train[0][:2], train[1][:2])).metadata
    assert meta["params_left_out"] == []
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())


def _costs(over: set[str]):
    return lambda name, probe: 1e6 if name in over else 1e-3


def test_auto_takes_ekfac_on_the_supported_part_when_nothing_else_fits(encoder_problem):
    model, task, train = encoder_problem
    auto = AutoCurvature(time_budget=1.0, cost_model=_costs({"gauss-newton", "exact", "arnoldi", "cg"}))
    inf = datatrace.InfluenceFunction(model, task, curvature=auto, progress=False).fit(train)
    assert inf.curvature_.info["auto_choice"] == "ekfac"
    assert "EK-FAC on its 6 supported parameter tensors" in inf.curvature_.info["auto_reason"]
    assert set(inf.score((train[0][:2], train[1][:2])).metadata["params_left_out"]) == LEFT_OUT


def test_auto_prefers_a_route_on_all_parameters_within_budget(encoder_problem):
    model, task, train = encoder_problem
    auto = AutoCurvature(time_budget=1.0, cost_model=_costs({"gauss-newton", "exact"}))
    inf = datatrace.InfluenceFunction(model, task, curvature=auto, progress=False).fit(train)
    assert inf.curvature_.info["auto_choice"] == "arnoldi"
    assert inf.score((train[0][:2], train[1][:2])).metadata["params_left_out"] == []


def test_auto_keeps_all_parameters_the_user_chose(encoder_problem):
    model, task, train = encoder_problem
    auto = AutoCurvature(time_budget=1.0, cost_model=_costs({"gauss-newton", "exact", "arnoldi", "cg"}))
    inf = datatrace.InfluenceFunction(
        model, task, curvature=auto, params=["norm", "head"], progress=False
    ).fit(train)
    assert inf.curvature_.info["auto_choice"] != "ekfac"
    assert inf.score((train[0][:2], train[1][:2])).metadata["num_params"] == 8 + 8 + 27


def test_factorized_projection_covers_the_supported_layers_by_default(encoder_problem, tmp_path):
    model, task, train = encoder_problem
    query = (train[0][:3], train[1][:3])
    covered = [n for n, _ in model.named_parameters() if n not in LEFT_OUT]

    def fit(params, store):
        projector = datatrace.FactorizedProjector(random_state=0)
        return datatrace.ProjectedInfluence(
            model, task, projector=projector, params=params, store_dir=store, progress=False
        ).fit(train)

    default = fit(None, tmp_path / "default")
    scores = default.score(query)
    assert set(scores.metadata["params_left_out"]) == LEFT_OUT
    torch.testing.assert_close(fit(covered, tmp_path / "explicit").score(query).values, scores.values)
    again = fit(None, tmp_path / "default")  # the stored features are reused: same scope, same fingerprints
    assert again.info["train_examples_processed"] == 0
    torch.testing.assert_close(again.score(query).values, scores.values)


def test_random_projection_keeps_every_parameter(encoder_problem):
    model, task, train = encoder_problem
    inf = datatrace.ProjectedInfluence(model, task, progress=False).fit(
        train
    )  # projector="auto": random here
    meta = inf.score((train[0][:2], train[1][:2])).metadata
    assert meta["params_left_out"] == []


def test_grouped_convolution_is_left_out_of_the_default_scope_and_refused_when_chosen():
    """A depthwise convolution (groups > 1) is not a K-FAC layer: the default scope leaves it out with the reason
    (scores equal those with the other parameters chosen by hand); choosing it explicitly is refused, with a fix
    that reads as one."""
    torch.manual_seed(0)
    X = torch.randn(40, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, groups=4, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    default = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False).fit((X, y))
    assert default.params_left_out_ == {
        "2.weight": "grouped Conv2d (groups=4): not supported",
        "2.bias": "grouped Conv2d (groups=4): not supported",
    }
    by_hand = datatrace.InfluenceFunction(
        model, task, curvature="ekfac", params=["0.weight", "0.bias", "6.weight", "6.bias"], progress=False
    ).fit((X, y))
    torch.testing.assert_close(default.score((X[:4], y[:4])).values, by_hand.score((X[:4], y[:4])).values)
    with pytest.raises(
        ValueError, match=r"grouped Conv2d \(groups=4\).*Fix: exclude its parameters with params=, or use "
    ) as err:
        datatrace.InfluenceFunction(
            model, task, curvature="ekfac", params=["2.weight", "6.weight"], progress=False
        ).fit((X, y))
    assert "use use" not in str(err.value)
