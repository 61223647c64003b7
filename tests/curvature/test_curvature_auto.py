"""curvature="auto": the first route of AUTO_ORDER that can run, fits max_bytes and is predicted to fit the time
budget (else the predicted-fastest that fits memory); the choice is logged and reported in info."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import datatrace
from datatrace.curvature import AutoCurvature, make_curvature
from datatrace.curvature import auto as auto_module
from datatrace.curvature.cost import Probe, predict_seconds
from datatrace.data import as_data_source
from datatrace.gradients.functional import FunctionalModel, prepare_model
from datatrace.verification.training import fit_full_batch


def _problem(model: nn.Module, n: int = 40, d: int = 5, k: int = 3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    return fit_full_batch(model.double(), task, (X, y), max_iter=300), task, (X, y)


def test_auto_is_the_default_and_equals_exact_for_a_small_model(caplog):
    """A linear model: Gauss-Newton (first in AUTO_ORDER, predicted well within the budget) is the Hessian."""
    torch.manual_seed(0)
    model, task, data = _problem(nn.Linear(5, 3))
    with caplog.at_level(logging.INFO, logger="datatrace.curvature.auto"):
        auto = datatrace.InfluenceFunction(model, task, progress=False).fit(data)
    exact = datatrace.InfluenceFunction(model, task, curvature="exact", progress=False).fit(data)
    info = auto.curvature_.info
    assert info["auto_choice"] == "gauss-newton" == auto_module.AUTO_ORDER[0]
    assert "chose 'gauss-newton'" in caplog.text and "took" in caplog.text
    assert "gauss-newton predicted" in info["auto_reason"] and "<= budget 30 s" in info["auto_reason"]
    assert info["auto_predicted_seconds"]["gauss-newton"] <= 30.0
    assert info["auto_fit_seconds"] >= 0.0
    torch.testing.assert_close(auto.score(data).values, exact.score(data).values)


def test_auto_picks_ekfac_when_the_dense_matrix_does_not_fit():
    torch.manual_seed(0)
    model, task, data = _problem(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    inf = datatrace.InfluenceFunction(model, task, curvature=AutoCurvature(max_bytes=1000), progress=False)
    inf.fit(data)
    assert inf.curvature_.info["auto_choice"] == "ekfac"
    assert "exact needs" in inf.curvature_.info["auto_reason"]  # the memory it would take, in words
    assert "ekfac predicted" in inf.curvature_.info["auto_reason"]
    exact = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", progress=False).fit(data)
    a, b = inf.score(data).values.flatten(), exact.score(data).values.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8


class _WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.fc(x))))


def test_auto_falls_back_to_cg_for_layers_ekfac_does_not_cover():
    torch.manual_seed(0)
    model, task, data = _problem(_WithNorm())
    inf = datatrace.InfluenceFunction(model, task, curvature=AutoCurvature(max_bytes=1000), progress=False)
    inf.fit(data)
    assert inf.curvature_.info["auto_choice"] == "cg"
    assert "norm" in inf.curvature_.info["auto_reason"]


def test_auto_by_name_and_bad_names():
    assert isinstance(make_curvature("auto"), AutoCurvature)
    with pytest.raises(ValueError, match="curvature"):
        make_curvature("ekfac-typo")


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.X[i], "y": self.y[i]}


class _DictTask(datatrace.Task):
    def outputs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    def loss_from_outputs(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, batch["y"], reduction="none")


def test_auto_picks_ekfac_for_dict_batches_as_for_tuples():
    """EK-FAC reads dict batches through the task: auto chooses it for a Dataset of dicts as for tuples, and the
    scores equal those of the same data as tuples."""
    torch.manual_seed(0)
    model, _, (X, y) = _problem(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    task = _DictTask(weight_decay=1e-2)
    inf = datatrace.InfluenceFunction(model, task, curvature=AutoCurvature(max_bytes=1000), progress=False)
    inf.fit(_DictDataset(X, y))
    assert inf.curvature_.info["auto_choice"] == "ekfac"
    tuples = datatrace.InfluenceFunction(
        model,
        datatrace.ClassificationTask(weight_decay=1e-2),
        curvature=AutoCurvature(max_bytes=1000),
        progress=False,
    ).fit((X, y))
    assert tuples.curvature_.info["auto_choice"] == "ekfac"
    torch.testing.assert_close(
        inf.score(_DictDataset(X[:3], y[:3])).values, tuples.score((X[:3], y[:3])).values
    )


@pytest.mark.parametrize("bad", [None, "4GB", True, -1, float("nan")])
def test_auto_max_bytes_is_checked_by_name(bad):
    with pytest.raises(ValueError, match=r"max_bytes=.*Fix: pass an integer >= 1"):
        AutoCurvature(max_bytes=bad)


# -- the time budget -----------------------------------------------------------------------------------------------
def _fmodel_and_data(problem) -> tuple[FunctionalModel, object]:
    fmodel = FunctionalModel(prepare_model(problem.model, torch.float64), problem.task)
    return fmodel, as_data_source(problem.train, "train")


def _fake(times: dict[str, float], calls: list | None = None):
    def cost(name: str, probe: Probe) -> float:
        assert isinstance(probe, Probe) and probe.num_params > 0
        if calls is not None:
            calls.append(name)
        return times[name]

    return cost


#: predicted seconds halving along AUTO_ORDER: the most accurate is the slowest
SLOW_FIRST = {name: 128.0 / 2**i for i, name in enumerate(auto_module.AUTO_ORDER)}


@pytest.mark.parametrize("expected", auto_module.AUTO_ORDER)
def test_auto_never_picks_a_route_predicted_over_its_budget(mlp_problem, expected):
    budget = 1.5 * SLOW_FIRST[expected]  # fits this route, not the one before it (twice as slow)
    fmodel, data = _fmodel_and_data(mlp_problem)
    auto = AutoCurvature(time_budget=budget, cost_model=_fake(SLOW_FIRST))
    route, reason = auto.choose(fmodel, data)
    assert route.name == expected and SLOW_FIRST[route.name] <= budget
    # every route tried before it was over the budget, and the reason says so with its prediction
    for name in auto_module.AUTO_ORDER[: auto_module.AUTO_ORDER.index(expected)]:
        assert f"{name} predicted {SLOW_FIRST[name]:g} s > budget {budget:g} s" in reason
    assert f"{expected} predicted {SLOW_FIRST[expected]:g} s <= budget" in reason


def test_auto_takes_the_predicted_fastest_when_none_fits_the_budget(mlp_problem):
    fmodel, data = _fmodel_and_data(mlp_problem)
    times = {"gauss-newton": 100.0, "exact": 90.0, "arnoldi": 80.0, "ekfac": 40.0, "cg": 70.0}
    auto = AutoCurvature(time_budget=30.0, cost_model=_fake(times))
    route, reason = auto.choose(fmodel, data)
    assert route.name == "ekfac"
    assert "none fits the budget: the predicted-fastest, ekfac" in reason
    auto.fit(fmodel, data, progress=False)
    assert auto.info["auto_predicted_seconds"] == times
    assert auto.info["auto_fit_seconds"] > 0


def test_auto_respects_max_bytes_before_time(mlp_problem):
    """The dense routes and Arnoldi do not fit 1 KB: they are neither predicted nor chosen, even when predicted
    fastest."""
    fmodel, data = _fmodel_and_data(mlp_problem)
    calls: list[str] = []
    times = {"gauss-newton": 0.1, "exact": 0.1, "arnoldi": 0.1, "ekfac": 50.0, "cg": 40.0}
    auto = AutoCurvature(max_bytes=1000, time_budget=30.0, cost_model=_fake(times, calls))
    route, reason = auto.choose(fmodel, data)
    assert sorted(calls) == ["cg", "ekfac"]
    assert route.name == "cg"  # the faster of the two that fit memory
    assert "gauss-newton needs" in reason and "max_bytes" in reason
    # within the budget: the first that fits memory
    auto = AutoCurvature(max_bytes=1000, time_budget=30.0, cost_model=_fake({**times, "ekfac": 1.0}))
    assert auto.choose(fmodel, data)[0].name == "ekfac"


def test_auto_without_a_time_budget_keeps_the_memory_rule(mlp_problem, monkeypatch):
    """time_budget=None: no probe, no prediction; the first route of AUTO_ORDER that fits memory. With the order
    auto had before (exact, EK-FAC, CG) that is exactly its old choice."""
    fmodel, data = _fmodel_and_data(mlp_problem)
    calls: list[str] = []
    never = _fake(dict.fromkeys(SLOW_FIRST, 1e9), calls)
    probes: list[int] = []
    monkeypatch.setattr(auto_module, "measure_probe", lambda *a, **k: probes.append(1))
    assert AutoCurvature(time_budget=None, cost_model=never).choose(fmodel, data)[0].name == "gauss-newton"
    monkeypatch.setattr(auto_module, "AUTO_ORDER", ("exact", "ekfac", "cg"))
    route, reason = AutoCurvature(time_budget=None, cost_model=never).choose(fmodel, data)
    assert route.name == "exact" and "no time budget" in reason
    small = AutoCurvature(max_bytes=1000, time_budget=None, cost_model=never)
    assert small.choose(fmodel, data)[0].name == "ekfac"
    assert calls == [] and probes == []


def test_auto_falls_back_to_the_memory_rule_when_the_probe_fails(mlp_problem, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the timing probe failed: a model error")

    monkeypatch.setattr(auto_module, "measure_probe", broken)
    fmodel, data = _fmodel_and_data(mlp_problem)
    route, reason = AutoCurvature(time_budget=30.0).choose(fmodel, data)
    assert route.name == auto_module.AUTO_ORDER[0]
    assert "the timing probe failed (RuntimeError), so memory alone decides" in reason


def test_auto_time_budget_and_cost_model_are_checked_by_name():
    with pytest.raises(ValueError, match=r"time_budget=.*Fix"):
        AutoCurvature(time_budget=-1.0)
    with pytest.raises(ValueError, match=r"cost_model=.*callable.*Fix"):
        AutoCurvature(cost_model="fast")


class _CountingTask(datatrace.ClassificationTask):
    """Counts the examples the model is run on (per loss call: the leading size of the inputs, 1 under vmap)."""

    def __init__(self) -> None:
        super().__init__(weight_decay=1e-2)
        self.calls = 0

    def outputs(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        self.calls += 1
        return super().outputs(model, batch)


class _CountingData(torch.utils.data.Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y, self.reads = X, y, 0

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple:
        self.reads += 1
        return self.X[i], self.y[i]


def test_the_probe_reads_a_few_batches_whatever_the_data_size():
    """The probe's cost is bounded by PROBE_EXAMPLES, not by n: the same few small batches and model calls for
    300 examples as for 1,200 (a count, not a timing)."""
    counts = []
    for n in (300, 1200):
        g = torch.Generator().manual_seed(0)
        X, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        task = _CountingTask()
        data = _CountingData(X, y)
        fmodel = FunctionalModel(prepare_model(model, torch.float64), task)
        probe = auto_module.measure_probe(fmodel, as_data_source(data, "train"))
        assert (probe.n_train, probe.num_params, probe.outputs, probe.layers) == (n, 75, 3, ((6, 8), (9, 3)))
        assert probe.grad_seconds > 0 and probe.hvp_vector_seconds > 0 and probe.matmul_flops > 0
        counts.append((data.reads, task.calls))
    assert counts[0] == counts[1]
    reads, calls = counts[0]
    # ten timed calls, on one batch or a quarter of it; one example for the outputs, one for EK-FAC's check
    assert reads <= 8 * auto_module.PROBE_EXAMPLES + 2
    assert calls <= 30


def test_cost_formulas():
    probe = Probe(
        num_params=1000,
        n_train=500,
        outputs=10,
        batch_size=100,
        grad_seconds=0.1,
        per_example_seconds=0.5,
        hvp_call_seconds=0.01,
        hvp_vector_seconds=0.002,
        matmul_flops=1e10,
        eigh_flops=2.5e9,
        layers=((65, 10),),
    )
    eigh_p = 9.0 * 1000**3 / 2.5e9
    # exact: 1000 columns in 4 chunks over 5 batches, plus eigh(p)
    assert predict_seconds("exact", probe) == pytest.approx(20 * 0.01 + 1000 * 0.002 + eigh_p)
    assert predict_seconds("gauss-newton", probe) == pytest.approx(
        10 * 0.5 + 2 * 500 * 10 * 1000**2 / 1e10 + eigh_p
    )
    # arnoldi: rank 200 -> 400 steps, one vector each
    assert predict_seconds("arnoldi", probe) == pytest.approx(
        400 * (5 * 0.01 + 0.002) + 2 * 400**2 * 1000 / 1e10 + 9.0 * 400**3 / 2.5e9
    )
    # CG grows with the queries; routes that need outputs or layers cannot run without them
    more = Probe(**{**probe.__dict__, "queries": 2000})
    assert predict_seconds("cg", more) > 5 * predict_seconds("cg", probe)
    assert predict_seconds("ekfac", probe) < predict_seconds("exact", probe)
    assert predict_seconds("ekfac", Probe(**{**probe.__dict__, "layers": None})) == float("inf")
    assert predict_seconds("gauss-newton", Probe(**{**probe.__dict__, "outputs": None})) == float("inf")
    with pytest.raises(ValueError, match=r"route_name=.*Fix"):
        predict_seconds("lissa", probe)
