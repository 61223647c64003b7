"""curvature="auto": exact when the dense matrix fits, EK-FAC when every parameter is in a supported layer, else
CG; the choice is logged and reported in info."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import datatrace
from datatrace.curvature import AutoCurvature, make_curvature
from datatrace.verification.training import fit_full_batch


def _problem(model: nn.Module, n: int = 40, d: int = 5, k: int = 3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    return fit_full_batch(model.double(), task, (X, y), max_iter=300), task, (X, y)


def test_auto_is_the_default_and_equals_exact_for_a_small_model(caplog):
    torch.manual_seed(0)
    model, task, data = _problem(nn.Linear(5, 3))
    with caplog.at_level(logging.INFO, logger="datatrace.curvature.auto"):
        auto = datatrace.InfluenceFunction(model, task, progress=False).fit(data)
    exact = datatrace.InfluenceFunction(model, task, curvature="exact", progress=False).fit(data)
    assert auto.curvature_.info["auto_choice"] == "exact"
    assert "chose 'exact'" in caplog.text
    torch.testing.assert_close(auto.score(data).values, exact.score(data).values)


def test_auto_picks_ekfac_when_the_dense_matrix_does_not_fit():
    torch.manual_seed(0)
    model, task, data = _problem(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    inf = datatrace.InfluenceFunction(model, task, curvature=AutoCurvature(max_bytes=1000), progress=False)
    inf.fit(data)
    assert inf.curvature_.info["auto_choice"] == "ekfac"
    assert "EK-FAC supports" in inf.curvature_.info["auto_reason"]
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


def test_auto_does_not_pick_ekfac_for_dict_batches():
    """EK-FAC's sampled Fisher rebuilds tuple batches; for a Dataset of dicts auto takes CG and says why."""
    torch.manual_seed(0)
    model, _, (X, y) = _problem(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    task = _DictTask(weight_decay=1e-2)
    inf = datatrace.InfluenceFunction(model, task, curvature=AutoCurvature(max_bytes=1000), progress=False)
    inf.fit(_DictDataset(X, y))
    assert inf.curvature_.info["auto_choice"] == "cg"
    assert "dicts" in inf.curvature_.info["auto_reason"]
    tuples = datatrace.InfluenceFunction(
        model,
        datatrace.ClassificationTask(weight_decay=1e-2),
        curvature=make_curvature("cg", matrix="gauss-newton"),
        progress=False,
    ).fit((X, y))
    torch.testing.assert_close(
        inf.score(_DictDataset(X[:3], y[:3])).values, tuples.score((X[:3], y[:3])).values
    )


@pytest.mark.parametrize("bad", [None, "4GB", True, -1, float("nan")])
def test_auto_max_bytes_is_checked_by_name(bad):
    with pytest.raises(ValueError, match=r"max_bytes=.*Fix: pass an integer >= 1"):
        AutoCurvature(max_bytes=bad)
