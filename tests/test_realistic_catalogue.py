"""Every problem of the realistic-model catalogue (benchmarks/realistic.py) builds, trains and scores at CI size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import datatrace
import realistic as catalogue


@pytest.mark.parametrize("name", sorted({**catalogue.CATALOGUE, **catalogue.VARIANTS}))
def test_problem_builds_trains_and_scores_at_ci_size(name: str) -> None:
    problem = catalogue.problem(name, scale="ci")
    train, test = problem.data()
    first = (lambda data: data["input_ids"]) if isinstance(train, dict) else (lambda data: data[0])
    assert len(first(train)) == problem.n_train and len(first(test)) == problem.n_test
    assert first(train).dtype in (torch.float32, torch.int64)  # float32 features or token ids
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


def test_language_model_problem_is_a_small_gpt2_on_docstring_windows() -> None:
    transformers = pytest.importorskip("transformers")
    from datatrace.hf import CausalLMTask

    full = catalogue.problem("lm")
    assert isinstance(full.task(), CausalLMTask) and full.recipe.optimizer == "adamw"
    assert 50_000 <= full.num_params() <= 300_000
    model = full.build_model(0)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2 ships
    vocab, length = full.arch[0], full.arch[1]
    train, test = catalogue.docstring_lm_data(200, 20, seed=0, vocab=vocab, length=length)
    assert train["input_ids"].shape == (200, length) and test["input_ids"].shape == (20, length)
    assert int(train["input_ids"].max()) < vocab and int(train["input_ids"].min()) >= 0
    assert (train["input_ids"] == catalogue.LM_EOS).any()  # docstring boundaries are tokens


def test_language_model_trains_and_caches_with_its_tied_embedding(tmp_path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setattr(catalogue, "CACHE_DIR", tmp_path)
    problem = catalogue.problem("lm", scale="ci")
    model = catalogue.trained(problem)
    again = catalogue.trained(problem)  # from the cache (safetensors with the shared tensor)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    _, test = problem.data()
    assert 1.0 < catalogue.perplexity(again, test) < problem.arch[0]
    assert 0.0 <= catalogue.accuracy(again, test) <= 1.0


def test_smooth_variant_differs_from_its_relu_problem_only_in_the_activation() -> None:
    relu, gelu = catalogue.problem("mlp-small"), catalogue.problem("mlp-small-gelu")
    assert relu.recipe == gelu.recipe and relu.data_kind == gelu.data_kind and relu.arch == gelu.arch
    assert relu.key() != gelu.key()  # separate caches
    kinds = [type(m) for m in gelu.build_model(0)]
    assert torch.nn.GELU in kinds and torch.nn.ReLU not in kinds
    for a, b in zip(relu.build_model(0).parameters(), gelu.build_model(0).parameters(), strict=True):
        assert torch.equal(a, b)  # the same initialisation
