"""Streamed training gradients (``keep_gradients``) and low-rank query compression (``query_rank``).

Oracles, float64: streaming recomputes the same per-example gradients, so every output equals the kept-gradient
run's; a rank at least every layer's own rank is no compression at all; a rank-r score equals the product with the
truncated SVD of each layer's solved query block computed here independently, and its error obeys the
Cauchy-Schwarz bound ``|<V - V_r, G_i>| <= ||V - V_r||_F ||G_i||_F`` per layer.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import datatrace
from datatrace import ClassificationTask, InfluenceFunction
from datatrace.attributors.query_rank import compress_queries
from datatrace.gradients.functional import FunctionalModel


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    X = torch.randn(60, 12, dtype=torch.float64)
    y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, (X[:50], y[:50]), (X[50:], y[50:])


def _fit(problem, **kw):
    model, train, _ = problem
    task = ClassificationTask(weight_decay=1e-2)
    return InfluenceFunction(model, task, progress=False, batch_size=16, **kw).fit(train)


@pytest.mark.parametrize("curvature", ["gauss-newton", "ekfac", "cg"])
def test_streamed_gradients_give_the_kept_results(problem, curvature):
    _, _, query = problem
    kept = _fit(problem, curvature=curvature, keep_gradients=True)
    streamed = _fit(problem, curvature=curvature, keep_gradients=False)
    assert not kept.streams_ and streamed.streams_ and streamed.local_grads_ is None
    torch.testing.assert_close(streamed.score(query).values, kept.score(query).values, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(streamed.self_influence(), kept.self_influence(), rtol=1e-9, atol=1e-12)
    idx = [7, 3, 7, 0]
    for name, value in kept.params_change(idx).items():
        torch.testing.assert_close(streamed.params_change(idx)[name], value, rtol=1e-9, atol=1e-12)
    for name, value in kept.removal_params([1, 4, 9]).items():
        torch.testing.assert_close(streamed.removal_params([1, 4, 9])[name], value, rtol=1e-9, atol=1e-12)
    assert streamed.score(query).metadata["route"] == kept.score(query).metadata["route"]


def test_auto_streams_above_max_bytes_and_says_so(problem, caplog):
    _, train, query = problem
    need = len(train[0]) * sum(p.numel() for p in problem[0].parameters()) * 8
    with caplog.at_level(logging.INFO, logger="datatrace.attributors.influence"):
        small = _fit(problem, curvature="gauss-newton", max_bytes=need - 1)
    assert small.streams_
    assert any(
        "streaming the training gradients" in r.getMessage() and "max_bytes" in r.getMessage()
        for r in caplog.records
    )
    roomy = _fit(problem, curvature="gauss-newton", max_bytes=need)
    assert not roomy.streams_
    torch.testing.assert_close(small.score(query).values, roomy.score(query).values, rtol=1e-9, atol=1e-12)
    with pytest.raises(
        RuntimeError, match=r"streams its training gradients.*Fix: fit with keep_gradients=True"
    ):
        small.train_grads_


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.5])
def test_keep_gradients_is_checked_by_name(problem, bad):
    with pytest.raises(ValueError, match=r"keep_gradients=.*Fix: pass one of True, False, 'auto'"):
        InfluenceFunction(problem[0], ClassificationTask(), keep_gradients=bad)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_query_rank_is_checked_by_name(problem, bad):
    with pytest.raises(ValueError, match=r"query_rank="):
        InfluenceFunction(problem[0], ClassificationTask(), query_rank=bad)


def test_a_rank_at_least_each_layers_own_is_no_compression(problem):
    _, _, query = problem
    full = _fit(problem, curvature="ekfac").score(query)
    same = _fit(problem, curvature="ekfac", query_rank=10).score(query)  # layers are 10 x 13 and 3 x 11
    torch.testing.assert_close(same.values, full.values, rtol=0, atol=0)
    assert same.metadata["query_rank"] == 10 and same.metadata["query_rank_energy_min"] == 1.0
    assert same.metadata["query_values_stored_fraction"] == 1.0


@pytest.mark.parametrize("streamed", [False, True])
def test_rank_r_scores_are_the_truncated_svd_products(problem, streamed):
    _, _, query = problem
    rank = 2
    inf = _fit(problem, curvature="gauss-newton", keep_gradients=not streamed)
    low = _fit(problem, curvature="gauss-newton", keep_gradients=not streamed, query_rank=rank).score(query)
    solved = inf.curvature_.solve(inf.query_gradients(query))  # (q, p): W1 (10x12), b1, W2 (3x10), b2
    grads = _fit(problem, curvature="gauss-newton", keep_gradients=True).train_grads_
    n = grads.shape[0]
    truncated = solved.clone()
    energies = []
    for w_at, b_at, out, inp in (
        (0, 120, 10, 12),
        (130, 160, 3, 10),
    ):  # layer 0: 10 x (12+1); layer 2: 3 x 11
        matrix = torch.cat(
            [solved[:, w_at : w_at + out * inp].reshape(-1, out, inp), solved[:, b_at : b_at + out, None]],
            dim=2,
        )
        u, s, vh = torch.linalg.svd(matrix)
        kept = (u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank]
        truncated[:, w_at : w_at + out * inp] = kept[:, :, :inp].reshape(-1, out * inp)
        truncated[:, b_at : b_at + out] = kept[:, :, inp]
        energies.append(s[:, :rank].pow(2).sum(1) / s.pow(2).sum(1))
    torch.testing.assert_close(low.values, truncated @ grads.T / n, rtol=1e-9, atol=1e-12)
    expected = float(torch.stack(energies).min())
    assert low.metadata["query_rank_energy_min"] == pytest.approx(expected, rel=1e-9)
    stored = (2 * (10 + 13 + 1) + 2 * (3 + 11 + 1)) / 163
    assert low.metadata["query_values_stored_fraction"] == pytest.approx(stored)


def test_rank_r_error_obeys_the_cauchy_schwarz_bound(problem):
    _, _, query = problem
    inf = _fit(problem, curvature="ekfac", keep_gradients=True)
    solved = inf.curvature_.solve(inf.query_gradients(query))
    compressed = compress_queries(solved, inf.fmodel_, 1)
    error = (solved - compressed.dense()).abs()
    assert compressed.stored_values < inf.fmodel_.num_params
    full_values = solved @ inf.train_grads_.T
    low_values = compressed.dot(inf.train_grads_)
    blocks = inf.fmodel_.space.slices()
    bound = torch.zeros_like(full_values)
    for layer in ("0", "2"):
        cols = torch.cat(
            [torch.arange(p.start, p.stop) for n, p in blocks.items() if n.startswith(layer + ".")]
        )
        bound += error[:, cols].pow(2).sum(1, keepdim=True).sqrt() * inf.train_grads_[:, cols].norm(dim=1)
    assert bool(((full_values - low_values).abs() <= bound * (1 + 1e-9) + 1e-15).all())
    assert float((full_values - low_values).abs().max()) > 0  # rank 1 does compress here


def test_query_rank_on_a_conv_model_keeps_the_layer_layout():
    torch.manual_seed(1)
    X = torch.randn(24, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 16, 3)).double()
    task = ClassificationTask(weight_decay=1e-1)
    inf = InfluenceFunction(model, task, curvature="ekfac", progress=False, keep_gradients=True).fit((X, y))
    solved = inf.curvature_.solve(inf.query_gradients((X[:4], y[:4])))
    compressed = compress_queries(solved, inf.fmodel_, 1)
    conv = solved[:, : 5 * 2 * 9 + 5]
    matrix = torch.cat([conv[:, :90].reshape(4, 5, 18), conv[:, 90:].reshape(4, 5, 1)], dim=2)
    u, s, vh = torch.linalg.svd(matrix)
    rank1 = s[:, :1, None] * u[:, :, :1] @ vh[:, :1]
    rebuilt = compressed.dense()[:, :95]
    torch.testing.assert_close(rebuilt[:, :90], rank1[:, :, :18].reshape(4, 90), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rebuilt[:, 90:], rank1[:, :, 18], rtol=1e-9, atol=1e-12)
    assert datatrace.InfluenceFunction(model, task, query_rank=1).query_rank == 1


def test_streamed_scores_come_from_the_layers_when_they_hold_every_parameter(problem, monkeypatch):
    _, _, query = problem
    """Streamed, no b x p rows are formed, neither in fit (the stationarity check's sums and norms come from the
    hooks too) nor in scoring; the hooks were checked once, on a few examples, against per-example autograd."""
    kept = _fit(problem, curvature="ekfac", keep_gradients=True)
    calls = []
    original = FunctionalModel.per_example_grads

    def counting(self, batch):
        calls.append(len(batch[0]))
        return original(self, batch)

    monkeypatch.setattr(FunctionalModel, "per_example_grads", counting)
    streamed = _fit(problem, curvature="ekfac", keep_gradients=False)
    assert calls == [] and streamed.fmodel_._layer_rows_checked
    torch.testing.assert_close(streamed.score(query).values, kept.score(query).values, rtol=1e-9, atol=1e-12)
    assert streamed._product_layers is not None and calls == []
    torch.testing.assert_close(streamed.self_influence(), kept.self_influence(), rtol=1e-9, atol=1e-12)
    # the stationarity check saw the same gradient sums and norms
    assert streamed.gradient_norm_ == pytest.approx(kept.gradient_norm_, rel=1e-9)
    ratio = streamed.curvature_.training_state.gradient_ratio
    assert ratio == pytest.approx(kept.curvature_.training_state.gradient_ratio, rel=1e-9)


def test_streamed_scores_use_gradient_rows_for_parameters_outside_the_layers(caplog):
    torch.manual_seed(2)
    X = torch.randn(30, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))

    class Tied(nn.Module):  # the output layer reuses the first layer's weight outside its own forward
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 6)
            self.norm = nn.LayerNorm(6)
            self.out = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.inp(x))
            return self.out(self.norm(h @ self.inp.weight))

    model = Tied().double()
    task = ClassificationTask(weight_decay=1e-1)
    args = {"curvature": "gauss-newton", "progress": False}
    kept = InfluenceFunction(model, task, keep_gradients=True, **args).fit((X, y))
    streamed = InfluenceFunction(model, task, keep_gradients=False, **args).fit((X, y))
    assert streamed._product_layers is None  # LayerNorm's parameters are outside the supported layers
    torch.testing.assert_close(
        streamed.score((X, y)).values, kept.score((X, y)).values, rtol=1e-9, atol=1e-12
    )
    with caplog.at_level(logging.INFO, logger="datatrace"):  # the hooks are checked in fit, once
        tied = InfluenceFunction(model, task, keep_gradients=False, params=["inp", "out"], **args).fit((X, y))
    assert any("differ from per-example autograd" in r.getMessage() for r in caplog.records)
    values = tied.score((X, y)).values
    assert tied._product_layers is None and tied.fmodel_.layer_rows is None
    reference = InfluenceFunction(model, task, keep_gradients=True, params=["inp", "out"], **args).fit((X, y))
    torch.testing.assert_close(values, reference.score((X, y)).values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("rank", [None, 2])
def test_score_candidates_are_the_scores_at_those_columns(problem, keep, rank, monkeypatch):
    _, _, query = problem
    inf = _fit(problem, curvature="ekfac", keep_gradients=keep, query_rank=rank)
    full = inf.score(query).values
    candidates = torch.stack(
        [torch.randperm(50, generator=torch.Generator().manual_seed(q))[:4] for q in range(10)]
    )
    if not keep:  # streamed: only the union of the candidates' gradients is recomputed
        seen = []
        original = FunctionalModel.per_example_grads

        def counting(self, batch):
            seen.append(len(batch[0]))
            return original(self, batch)

        monkeypatch.setattr(FunctionalModel, "per_example_grads", counting)
    values = inf.score_candidates(query, candidates)
    torch.testing.assert_close(values, torch.gather(full, 1, candidates), rtol=1e-9, atol=1e-12)
    if not keep:
        assert sum(seen) == len(torch.unique(candidates))  # training gradients of the candidates' union only
    with pytest.raises(ValueError, match="candidates"):
        inf.score_candidates(query, candidates[:3])
