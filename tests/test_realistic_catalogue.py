"""Every problem of the realistic-model catalogue (benchmarks/realistic.py) builds, trains and scores at CI size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import datatrace
import realistic as catalogue


@pytest.mark.parametrize("name", sorted(catalogue.CATALOGUE))
def test_problem_builds_trains_and_scores_at_ci_size(name: str) -> None:
    problem = catalogue.problem(name, scale="ci")
    train, test = problem.data()
    assert len(train[0]) == problem.n_train and len(test[0]) == problem.n_test
    assert train[0].dtype in (torch.float32, torch.int64)  # float32 features or token ids
    model = problem.train_fn()(train, seed=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    again = problem.train_fn()(train, seed=0)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # the ground truth's retrains are reproducible
    scores = datatrace.InfluenceFunction(model, problem.task(), curvature="identity", progress=False)
    values = scores.fit(train).score(test).values
    assert values.shape == (problem.n_test, problem.n_train)
    assert torch.isfinite(values).all()


def test_full_problems_keep_their_documented_sizes() -> None:
    sizes = {name: p.num_params() for name, p in catalogue.CATALOGUE.items()}
    assert 2_000 <= sizes["mlp-small"] <= 3_000
    assert 9_000 <= sizes["mlp-large"] <= 50_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in catalogue.problem("cnn").build_model(0).modules())
    text = catalogue.problem("text").build_model(0)
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in text.modules())
    assert any(isinstance(m, torch.nn.Embedding) for m in text.modules())


def test_docstring_text_is_offline_and_labelled_by_group() -> None:
    (ids, labels), _ = catalogue.docstring_data(300, 20, seed=0, vocab=200, length=16)
    assert ids.shape == (300, 16) and ids.dtype == torch.int64
    assert int(ids.max()) < 200 and set(labels.tolist()) <= set(range(len(catalogue.DOCSTRING_GROUPS)))
    assert len(set(labels.tolist())) == len(catalogue.DOCSTRING_GROUPS)
