"""Dict batches (the Hugging Face form) through the layer-structured routes, and the ready Hugging Face tasks.

The first part needs no transformers: dict batches through K-FAC / EK-FAC / the factorised projection must give
the scores of the same data as tuples (float64 oracle). The second part builds a one-layer BERT and GPT-2 from
their configs (no download) and checks the routes run, and the causal-LM loss and completion measurement against
log-likelihoods computed by hand.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import datatrace
from datatrace.curvature.kfac import EKFAC, KFAC
from datatrace.hf import IGNORE_INDEX, CausalLMTask, SequenceClassificationTask, prompt_completion
from dict_data import DictDataset

WD = 1e-2


# -- dict batches give the tuple scores (no transformers needed) ---------------------------------------------------


@pytest.fixture
def mlp_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.arange(30) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, X, y


ROUTES = {
    "kfac": lambda m, t: datatrace.InfluenceFunction(m, t, curvature=KFAC(), progress=False),
    "ekfac": lambda m, t: datatrace.InfluenceFunction(m, t, curvature=EKFAC(), progress=False),
    "ekfac-sampled": lambda m, t: datatrace.InfluenceFunction(
        m, t, curvature=EKFAC(fisher="sampled", n_samples=2, random_state=3), progress=False
    ),
    "factorized": lambda m, t: datatrace.ProjectedInfluence(
        m, t, projector=datatrace.FactorizedProjector(), progress=False
    ),
    "random": lambda m, t: datatrace.ProjectedInfluence(
        m, t, projector=datatrace.RandomProjector(), progress=False
    ),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_dict_batches_give_the_scores_of_the_tuple_form(route, mlp_problem):
    model, X, y = mlp_problem
    make = ROUTES[route]
    dicts = make(model, datatrace.ClassificationTask(WD, input_key="x", target_key="labels"))
    dicts.fit(DictDataset(x=X, labels=y))
    tuples = make(model, datatrace.ClassificationTask(WD)).fit((X, y))
    expected = tuples.score((X[:4], y[:4])).values
    torch.testing.assert_close(dicts.score(DictDataset(x=X[:4], labels=y[:4])).values, expected)
    assert torch.isfinite(expected).all() and expected.abs().amax() > 0


def test_sample_targets_keeps_the_dict_form_and_draws_the_labels():
    task = datatrace.ClassificationTask(input_key="x", target_key="labels")
    logits = torch.tensor([[20.0, 0.0, 0.0], [0.0, 0.0, 20.0]], dtype=torch.float64)
    batch = {"x": torch.zeros(2, 4), "labels": torch.tensor([1, 1]), "extra": torch.ones(2)}
    sampled = task.sample_targets(logits, batch, torch.Generator().manual_seed(0))
    assert set(sampled) == {"x", "labels", "extra"} and sampled["x"] is batch["x"]
    assert sampled["labels"].tolist() == [0, 2] and sampled["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [1, 1]  # the given batch is not modified


def test_a_tuple_task_on_dict_batches_names_the_keys_and_the_fix(mlp_problem):
    model, X, y = mlp_problem
    inf = datatrace.InfluenceFunction(
        model, datatrace.ClassificationTask(WD), curvature="ekfac", progress=False
    )
    with pytest.raises(
        ValueError, match=r"input_key=None.*keys \['labels', 'x'\].*Fix: pass ClassificationTask"
    ):
        inf.fit(DictDataset(x=X, labels=y))
    with pytest.raises(ValueError, match=r"target_key='y'.*keys \['labels', 'x'\]"):
        datatrace.InfluenceFunction(
            model,
            datatrace.ClassificationTask(WD, input_key="x", target_key="y"),
            curvature="ekfac",
            progress=False,
        ).fit(DictDataset(x=X, labels=y))


def test_a_batch_encoding_is_read_as_a_dataset_of_dicts(mlp_problem, transformers):
    """A tokenizer's output (``BatchEncoding``, a dict of columns) with labels added is data as it is."""
    model, X, y = mlp_problem
    task = datatrace.ClassificationTask(WD, input_key="x")
    encoding = transformers.BatchEncoding({"x": X, "labels": y})
    inf = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False).fit(encoding)
    expected = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False).fit(
        DictDataset(x=X, labels=y)
    )
    query = transformers.BatchEncoding({"x": X[:3], "labels": y[:3]})
    torch.testing.assert_close(
        inf.score(query).values, expected.score(DictDataset(x=X[:3], labels=y[:3])).values
    )


# -- tiny Hugging Face models ----------------------------------------------------------------------------------------

N, T, V = 8, 5, 100


def _tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(N, T)`` in 1..V-1, right-padded (id 0, mask 0) on every third sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[::3, T - 2 :] = 0
    return ids * mask, mask


@pytest.fixture
def bert(transformers):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    ids, mask = _tokens()
    return model, DictDataset(input_ids=ids, attention_mask=mask, labels=torch.arange(N) % 3)


@pytest.fixture
def gpt2(transformers):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    ids, mask = _tokens(1)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return model, DictDataset(input_ids=ids, attention_mask=mask, labels=labels)


def _check_scores(scores: datatrace.Scores, n_query: int) -> None:
    assert scores.values.shape == (n_query, N)
    assert torch.isfinite(scores.values).all() and scores.values.abs().amax() > 0


def test_ekfac_and_projected_run_on_a_tiny_bert(bert):
    model, data = bert
    task = SequenceClassificationTask(weight_decay=WD)
    inf = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False).fit(data)
    _check_scores(inf.score(data.head(3)), 3)
    assert any(
        "embeddings" in name for name in inf.params_left_out_
    )  # embeddings/LayerNorm left out, and said
    projected = datatrace.ProjectedInfluence(
        model, task, projector=datatrace.FactorizedProjector(), progress=False
    ).fit(data)
    _check_scores(projected.score(data.head(2)), 2)


def test_ekfac_and_projected_run_on_a_tiny_gpt2(gpt2):
    model, data = gpt2
    task = CausalLMTask(weight_decay=WD)
    inf = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False).fit(data)
    _check_scores(inf.score(data.head(2)), 2)
    sampled = datatrace.InfluenceFunction(model, task, curvature=EKFAC(fisher="sampled"), progress=False)
    _check_scores(sampled.fit(data).score(data.head(2)), 2)
    projected = datatrace.ProjectedInfluence(
        model, task, projector=datatrace.FactorizedProjector(), fisher="empirical", progress=False
    ).fit(data)
    _check_scores(projected.score(data.head(2)), 2)


def _log_likelihood(model: nn.Module, ids: list[int], start: int) -> float:
    """``sum_{t >= start} log p(ids[t] | ids[:t])`` by hand, from the unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_causal_lm_loss_is_the_summed_negative_log_likelihood_with_padding(gpt2):
    model, _ = gpt2
    model.eval()
    seqs = [[5, 17, 3, 42, 8], [9, 61, 2]]
    ids = torch.tensor([s + [0] * (5 - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (5 - len(s)) for s in seqs])
    task = CausalLMTask()
    with torch.no_grad():
        loss = task.loss(model, {"input_ids": ids, "attention_mask": mask}).double()
    expected = torch.tensor([-_log_likelihood(model, s, 1) for s in seqs], dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # Hugging Face's own loss is the mean over the same tokens
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([seqs[0]]), labels=torch.tensor([seqs[0]])).loss
    assert math.isclose(float(hf) * (len(seqs[0]) - 1), float(loss[0]), rel_tol=1e-5)


def test_the_measurement_of_a_completion_is_its_negative_log_likelihood_given_the_prompt(gpt2):
    model, _ = gpt2
    model.eval()
    prompt, completion = [7, 31, 4], [55, 2]
    example = prompt_completion(torch.tensor(prompt), torch.tensor(completion), pad_to=8)
    assert example["labels"].tolist() == [IGNORE_INDEX] * 3 + completion + [IGNORE_INDEX] * 3
    batch = {k: v[None] for k, v in example.items()}
    with torch.no_grad():
        measured = float(CausalLMTask().measurement(model, batch)[0])
    expected = -_log_likelihood(model, prompt + completion, len(prompt))
    assert math.isclose(measured, expected, rel_tol=1e-5)


def test_sampled_lm_targets_keep_the_valid_positions(gpt2):
    model, data = gpt2
    batch = {k: v[:3] for k, v in data.columns.items()}
    task = CausalLMTask()
    with torch.no_grad():
        outputs = task.outputs(model, batch)
    sampled = task.sample_targets(outputs, batch, torch.Generator().manual_seed(0))
    _, valid = task.next_tokens(batch)
    _, valid_sampled = task.next_tokens(sampled)
    assert torch.equal(valid, valid_sampled) and sampled["input_ids"] is batch["input_ids"]
    assert ((sampled["labels"] >= 0) & (sampled["labels"] < V) | (sampled["labels"] == IGNORE_INDEX)).all()
    # the closed-form output gradient and Hessian factors are those of the loss
    g = task.output_gradient(outputs.double(), batch)
    o = outputs.double().requires_grad_(True)
    (auto,) = torch.autograd.grad(task.loss_from_outputs(o, batch).sum(), o)
    torch.testing.assert_close(g, auto.reshape(3, -1))


def test_lm_hessian_factors_are_the_softmax_blocks():
    task = CausalLMTask()
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    batch = {
        "input_ids": torch.tensor([[1, 2, 3], [1, 2, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    L = task.output_hessian_factors(outputs, batch)

    def loss(o: torch.Tensor, i: int) -> torch.Tensor:
        return task.loss_from_outputs(o.reshape(1, 3, 4), {k: v[i : i + 1] for k, v in batch.items()})[0]

    for i in range(2):
        H = torch.autograd.functional.hessian(lambda o, i=i: loss(o, i), outputs[i].reshape(-1))
        torch.testing.assert_close(L[i] @ L[i].T, H)


def test_hf_tasks_name_what_they_cannot_read(gpt2, caplog):
    model, data = gpt2
    with pytest.raises(
        ValueError, match=r"CausalLMTask reads dict batches.*Fix: pass a Dataset whose items are dicts"
    ):
        CausalLMTask().loss(model, (torch.zeros(2, 3, dtype=torch.long),))
    bad = DictDataset(**{k: v.clone() for k, v in data.columns.items()})
    bad.columns["labels"][4, 2] = 100  # outside the vocabulary of 100
    inf = datatrace.InfluenceFunction(model, CausalLMTask(), curvature="ekfac", progress=False)
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(ValueError, match=r"labels holds 100 at example 4, position 2"),
    ):
        inf.fit(bad)


def test_the_exact_lm_output_hessian_is_refused_for_a_long_vocabulary_by_name():
    outputs = torch.zeros(1, 50, 100, dtype=torch.float64)  # 5,000 outputs per sequence
    batch = {"input_ids": torch.ones(1, 50, dtype=torch.long)}
    with pytest.raises(
        ValueError, match=r"fisher='ggn' is not allowed.*5000 outputs.*Fix: use fisher='sampled'"
    ):
        CausalLMTask().output_hessian_factors(outputs, batch)


def test_examples_of_different_lengths_name_the_field_and_the_padding_fix():
    class Ragged(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": torch.arange(3 + i), "labels": torch.tensor(i % 2)}

    inf = datatrace.InfluenceFunction(nn.Linear(3, 2), SequenceClassificationTask(), progress=False)
    with pytest.raises(
        ValueError, match=r"train\[...\]\['input_ids'\]=.*examples of shapes.*DataCollatorWithPadding"
    ):
        inf.fit(Ragged())


def test_sequences_longer_than_the_positions_and_ids_outside_the_vocabulary_are_named(gpt2, bert):
    model, _ = gpt2
    long = DictDataset(input_ids=torch.ones(2, 40, dtype=torch.long))  # n_positions = 32
    inf = datatrace.InfluenceFunction(model, CausalLMTask(), curvature="ekfac", progress=False)
    with pytest.raises(
        ValueError, match=r"sequences of 40 tokens.*position embeddings for 32 tokens.*max_length=32"
    ):
        inf.fit(long)
    model, data = bert
    ids = data.columns["input_ids"].clone()
    ids[5, 1] = V
    bad = DictDataset(
        input_ids=ids, attention_mask=data.columns["attention_mask"], labels=data.columns["labels"]
    )
    inf = datatrace.InfluenceFunction(model, SequenceClassificationTask(), curvature="ekfac", progress=False)
    with pytest.raises(
        ValueError, match=r"input_ids holds 100 at example 5, position 1, outside the vocabulary"
    ):
        inf.fit(bad)


def test_a_hugging_face_model_with_the_plain_task_names_the_hf_task(bert):
    model, data = bert
    ids, labels = data.columns["input_ids"], data.columns["labels"]
    inf = datatrace.InfluenceFunction(
        model, datatrace.ClassificationTask(), curvature="ekfac", progress=False
    )
    with pytest.raises(ValueError, match=r"ModelOutput.*Fix: use datatrace.hf.SequenceClassificationTask"):
        inf.fit((ids, labels))


def test_token_influence_splits_each_score_over_the_training_tokens(gpt2):
    from datatrace.apps.tokens import token_influence

    model, data = gpt2
    task = CausalLMTask(weight_decay=WD)
    for curvature in ("ekfac", "cg"):
        inf = datatrace.InfluenceFunction(model, task, curvature=curvature, progress=False).fit(data)
        query = data.head(2)
        scores = inf.score(query).values
        tokens = token_influence(inf, query, [0, 3, 5])
        assert tokens.shape[:2] == (2, 3)
        assert torch.allclose(tokens.sum(-1), scores[:, [0, 3, 5]], rtol=1e-8, atol=1e-12)
        # token 0 is predicted by nothing, and padded positions carry nothing
        assert bool((tokens[..., 0] == 0).all())
        mask = data[3]["attention_mask"]
        assert bool((tokens[:, 1, mask == 0] == 0).all())
    with pytest.raises(ValueError, match="loss_terms"):
        token_influence(datatrace.InfluenceFunction(nn.Linear(2, 2).double(), datatrace.ClassificationTask(),
                                                    progress=False).fit((torch.randn(4, 2).double(), torch.tensor([0, 1, 0, 1]))),
                        (torch.randn(1, 2).double(), torch.tensor([0])), [0])  # fmt: skip
