"""One contract over every attributor (:class:`datatrace.attributors.base.Attributor`): shapes, the sign convention
against the exact route on a convex problem, ``top_k``, self-influence, ``NotFittedError`` before ``fit``,
refused ``measurement=`` and the ``Scores`` file round trip."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from datatrace import (
    TRAK,
    InfluenceFunction,
    NotFittedError,
    ProjectedInfluence,
    RandomProjector,
    Scores,
    SklearnInfluence,
    TopK,
    TracIn,
    from_sklearn,
)
from datatrace.apps import debug_data, explain, value_data
from datatrace.attributors.base import Attributor

#: every route, built unfitted from a catalogue problem (``sklearn``: from an estimator refitted on its data)
Builder = Callable[..., Attributor]


def _sklearn_estimator(problem) -> LogisticRegression:
    X, y = problem.train
    C = 1.0 / (
        problem.task.weight_decay * len(X)
    )  # the same L2 strength on the weights as the catalogue's task
    return LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(X.numpy(), y.numpy())


BUILDERS: dict[str, Builder] = {
    "influence-exact": lambda p: InfluenceFunction(p.model, p.task, curvature="exact", progress=False),
    "influence-cg": lambda p: InfluenceFunction(p.model, p.task, curvature="cg", progress=False),
    "influence-ekfac": lambda p: InfluenceFunction(p.model, p.task, curvature="ekfac", progress=False),
    "projected": lambda p: ProjectedInfluence(
        p.model, p.task, projector=RandomProjector(dim=64), dtype=torch.float64, progress=False
    ),
    "trak": lambda p: TRAK(
        [p.model, p.model], p.task, projector=RandomProjector(dim=64), dtype=torch.float64, progress=False
    ),
    "tracin": lambda p: TracIn(
        p.model,
        p.task,
        [{k: v.clone() for k, v in p.model.state_dict().items()}],
        [1.0],
        batch_size_train="full",
        progress=False,
    ),
    "sklearn": lambda p: SklearnInfluence(_sklearn_estimator(p)),
}
#: routes that estimate the same leave-one-out numbers as the exact route (TracIn follows the trajectory instead)
APPROXIMATES_EXACT = ("influence-cg", "influence-ekfac", "projected", "trak", "sklearn")


def _data(name: str, data: tuple) -> tuple:
    return tuple(t.numpy() for t in data) if name == "sklearn" else data


@pytest.fixture(scope="module")
def fitted(logreg_problem) -> dict[str, Attributor]:
    out = {}
    for name, build in BUILDERS.items():
        if name == "sklearn":
            X, y = _data(name, logreg_problem.train)
            out[name] = from_sklearn(_sklearn_estimator(logreg_problem), X, y)
        else:
            out[name] = build(logreg_problem).fit(logreg_problem.train)
    return out


@pytest.fixture(scope="module")
def exact_scores(fitted, logreg_problem) -> torch.Tensor:
    return fitted["influence-exact"].score(logreg_problem.query).values


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy())[0, 1])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_not_fitted_raises_not_fitted_error(name, logreg_problem):
    attributor = BUILDERS[name](logreg_problem)
    assert isinstance(attributor, Attributor) and not attributor.is_fitted
    query = _data(name, logreg_problem.query)
    calls = [
        lambda: attributor.score(query),
        lambda: attributor.self_influence(),
        lambda: attributor.top_k(query, 3),
        lambda: attributor.n_train,
    ]
    for call in calls:
        with pytest.raises(
            NotFittedError, match=rf"this {type(attributor).__name__} is not fitted.*\.fit\(train\)"
        ):
            call()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_shapes_top_k_and_self_influence(name, fitted, logreg_problem):
    attributor = fitted[name]
    query, train = _data(name, logreg_problem.query), _data(name, logreg_problem.train)
    n_query, n_train = len(query[0]), len(train[0])
    assert attributor.is_fitted and attributor.n_train == n_train
    scores = attributor.score(query)
    assert isinstance(scores, Scores) and scores.values.shape == (n_query, n_train)
    assert bool(torch.isfinite(scores.values).all())
    # top_k means the same everywhere: the k largest |score| per query, as Scores.top_k
    top, want = attributor.top_k(query, 5), scores.top_k(5)
    assert isinstance(top, TopK) and top.indices.shape == (n_query, 5)
    assert torch.equal(top.indices, want.indices)
    assert torch.allclose(top.values, want.values, rtol=1e-9, atol=1e-15)
    # self-influence is the score of every training example on its own loss
    self_inf = attributor.self_influence()
    assert self_inf.shape == (n_train,)
    on_train = attributor.score(train).values
    assert torch.allclose(self_inf.double(), torch.diagonal(on_train).double(), rtol=1e-8, atol=1e-14)
    assert bool((self_inf > 0).all())


@pytest.mark.parametrize("name", APPROXIMATES_EXACT)
def test_sign_convention_against_the_exact_route(name, fitted, logreg_problem, exact_scores):
    values = fitted[name].score(_data(name, logreg_problem.query)).values.double()
    assert _pearson(values, exact_scores) > 0.9
    # the exact route's strongest proponent and opponent of each query keep their sign
    rows = torch.arange(exact_scores.shape[0])
    assert bool((values[rows, exact_scores.argmax(dim=1)] > 0).all())
    assert bool((values[rows, exact_scores.argmin(dim=1)] < 0).all())


def test_tracin_keeps_the_sign_convention(fitted, logreg_problem, exact_scores):
    """TracIn at the end point (gradient dot products, no curvature) ranks differently from the exact route, but
    positive still means a proponent: the exact route's strongest proponent and opponent keep their sign."""
    values = fitted["tracin"].score(logreg_problem.query).values
    assert _pearson(values, exact_scores) > 0.5
    rows = torch.arange(exact_scores.shape[0])
    assert bool((values[rows, exact_scores.argmax(dim=1)] > 0).all())
    assert bool((values[rows, exact_scores.argmin(dim=1)] < 0).all())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_metadata_and_save_load_round_trip(name, fitted, logreg_problem, tmp_path):
    scores = fitted[name].score(_data(name, logreg_problem.query))
    for key in ("estimator", "route", "damping", "n_train", "units"):
        assert key in scores.metadata, key
    assert scores.metadata["n_train"] == fitted[name].n_train
    json.dumps(scores.metadata)
    back = Scores.load(scores.save(tmp_path / f"{name}.safetensors"))
    assert torch.equal(back.values, scores.values)
    assert back.metadata == scores.metadata and back.measurement == scores.measurement


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_measurement_is_used_or_refused_clearly(name, fitted, logreg_problem):
    attributor = fitted[name]
    query = _data(name, logreg_problem.query)

    def logit_0(model, batch):
        return model(batch[0])[:, 0]

    if attributor.supports_measurement:
        values = attributor.score(query, logit_0).values
        assert values.shape == (len(query[0]), attributor.n_train)
        assert attributor.query_gradients(query, logit_0).shape[-2] == len(query[0])
        # the task's measurement is its loss: passing the loss explicitly gives the default scores
        explicit = attributor.score(query, attributor.task.loss).values
        assert torch.allclose(explicit, attributor.score(query).values, rtol=1e-12, atol=0)
    else:
        with pytest.raises(
            ValueError, match=rf"measurement=.*{type(attributor).__name__}.*InfluenceFunction"
        ):
            attributor.score(query, logit_0)
        with pytest.raises(ValueError, match="measurement="):
            attributor.top_k(query, 3, logit_0)


@pytest.mark.parametrize("name", ["projected", "trak"])
@pytest.mark.parametrize("k", [30, 48, 100])
def test_streamed_top_k_when_proponents_and_opponents_overlap(name, k, fitted, logreg_problem):
    """With ``2k`` above the number of training examples the proponent and opponent lists share indices: each
    still counts once, and the result is Scores.top_k of the dense scores."""
    attributor = fitted[name]
    scores = attributor.score(logreg_problem.query)
    top, want = attributor.top_k(logreg_problem.query, k), scores.top_k(k)
    assert (
        top.indices.shape == want.indices.shape == (len(logreg_problem.query[0]), min(k, attributor.n_train))
    )
    for got_row, want_row in zip(top.indices, want.indices):
        assert sorted(got_row.tolist()) == sorted(want_row.tolist())
    assert torch.allclose(top.values.abs(), want.values.abs(), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_applications_work_with_every_attributor(name, fitted, logreg_problem):
    """The applications use the contract only, so every route works with them (TRAK has no single model, which
    the applications that need the model say)."""
    attributor = fitted[name]
    query, train = _data(name, logreg_problem.query), _data(name, logreg_problem.train)
    scores = attributor.score(query)
    explained = explain(attributor, query, k=3)
    assert [e.query_index for e in explained] == list(range(len(query[0])))
    assert np.array_equal(explained[0].score_row, scores.values[0].double().numpy())
    assert np.allclose(value_data(attributor, query).values, scores.total().double().numpy())
    if name == "trak":
        with pytest.raises(ValueError, match=r"influence=.*TRAK has none"):
            debug_data(attributor, validation=query, train=train)
        return
    result = debug_data(attributor, validation=query, train=train)
    assert np.allclose(result.self_influence, attributor.self_influence().double().numpy())
    assert result.training_loss.shape == (attributor.n_train,) and bool((result.training_loss > 0).all())
