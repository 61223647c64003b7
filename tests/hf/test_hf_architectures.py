"""Hugging Face architectures as users bring them (tiny configs, no download), float64.

1. **Left padding changes nothing** (common for decoder-only models): left-padded sequences give the scores of the
   same sequences unpadded, on absolute positions (GPT-2) and rotary ones (Llama), with eager and SDPA attention.
   Without care, the model sees the real tokens at shifted positions, the padded position before the first token
   "predicts" it, and eager attention in float64 turns the fully masked rows of the padding into NaN.
2. **Eager and SDPA attention give the same scores.**
3. **Layers a route cannot follow, and objectives a task does not compute, are named**: OPT's MLP on flattened
   examples is left out by name; a regression model gets its own task; a multi-label model, an encoder-decoder
   model and per-token labels are refused with the fix.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits

import datatrace
from datatrace.apps.tokens import token_influence
from datatrace.curvature.kfac import EKFAC
from datatrace.hf import (
    IGNORE_INDEX,
    CausalLMTask,
    SequenceClassificationTask,
    SequenceRegressionTask,
    logits_of,
    model_inputs,
)
from dict_data import DictDataset

N, L, EXTRA, V = 6, 5, 2, 20
WD = 1e-2


def causal_lm(transformers, name: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16)
        model = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=24, vocab_size=V, max_position_embeddings=16,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM
    config._attn_implementation = attn
    return model(config).double().eval()


def sequences(n: int, seed: int, pad: str | None) -> DictDataset:
    """``n`` sequences of ``L`` tokens in 1..V-1, unpadded or padded by ``EXTRA`` positions on the ``pad`` side."""
    ids = torch.randint(1, V, (n, L), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad is not None:
        zeros = torch.zeros(n, EXTRA, dtype=torch.long)
        ids, mask = (
            torch.cat([zeros, t], 1) if pad == "left" else torch.cat([t, zeros], 1) for t in (ids, mask)
        )
    return DictDataset(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX))


ROUTES = {
    "cg": lambda m: datatrace.InfluenceFunction(m, CausalLMTask(WD), curvature="cg", progress=False),
    "ekfac": lambda m: datatrace.InfluenceFunction(
        m, CausalLMTask(WD), curvature=EKFAC(fisher="sampled", random_state=0), progress=False
    ),
}


def scores(model: torch.nn.Module, route: str, pad: str | None) -> torch.Tensor:
    inf = ROUTES[route](model).fit(sequences(N, 0, pad))
    values = inf.score(sequences(2, 1, pad)).values
    assert values.shape == (2, N) and torch.isfinite(values).all() and values.abs().amax() > 0
    return values


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize(("name", "attn"), [("gpt2", "sdpa"), ("llama", "eager"), ("llama", "sdpa")])
def test_left_padding_does_not_change_the_scores(name, attn, route, transformers):
    model = causal_lm(transformers, name, attn)
    plain = scores(model, route, None)
    for pad in ("left", "right"):
        torch.testing.assert_close(
            scores(model, route, pad), plain, rtol=1e-9, atol=1e-9 * float(plain.abs().amax())
        )


@pytest.mark.parametrize(("name", "tol"), [("gpt2", 1e-9), ("llama", 1e-5)])
def test_eager_and_sdpa_attention_give_the_same_scores(name, tol, transformers):
    """Llama's eager attention takes its softmax in float32 even in a float64 model: agreement to float32."""
    eager = scores(causal_lm(transformers, name, "eager"), "cg", "left")
    sdpa = scores(causal_lm(transformers, name, "sdpa"), "cg", "left")
    torch.testing.assert_close(sdpa, eager, rtol=tol, atol=tol * float(eager.abs().amax()))


def test_layers_run_on_flattened_examples_are_left_out_by_name(transformers):
    """OPT's MLP runs on ``(b * T, d)``: K-FAC/EK-FAC and the factorised projection cannot tell its rows apart by
    example, so with the default scope they leave ``fc1``/``fc2`` out and say why, instead of refusing the model."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=24, vocab_size=V,
        max_position_embeddings=16, word_embed_proj_dim=16,
    )  # fmt: skip
    model = transformers.OPTForCausalLM(config).double().eval()
    train, query = sequences(N, 0, "right"), sequences(2, 1, "right")
    inf = datatrace.InfluenceFunction(model, CausalLMTask(WD), curvature="ekfac", progress=False).fit(train)
    values = inf.score(query).values
    assert values.shape == (2, N) and torch.isfinite(values).all() and values.abs().amax() > 0
    fc = {k: v for k, v in inf.params_left_out_.items() if ".fc" in k}
    assert sorted(fc) == [f"model.decoder.layers.0.fc{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    assert all("batch axis" in why for why in fc.values())
    assert "model.decoder.layers.0.self_attn.q_proj.weight" not in inf.params_left_out_
    projected = datatrace.ProjectedInfluence(
        model, CausalLMTask(WD), projector=datatrace.FactorizedProjector(), progress=False
    ).fit(train)
    assert torch.isfinite(projected.score(query).values).all()


# -- models whose objective is not the task's: supported by another task, or refused by name ----------------------


def bert_classifier(transformers, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, **config,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double().eval()


def encoded(labels: torch.Tensor) -> DictDataset:
    ids = torch.randint(1, V, (len(labels), L), generator=torch.Generator().manual_seed(0))
    return DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_a_regression_model_is_scored_by_its_squared_error_and_refused_by_the_classification_task(
    transformers,
):
    model = bert_classifier(transformers, num_labels=1, problem_type="regression")
    data = encoded(torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"problem_type='regression'.*Fix: use datatrace.hf.SequenceRegressionTask"
    ):
        datatrace.InfluenceFunction(model, SequenceClassificationTask(WD), progress=False).fit(data)
    task = SequenceRegressionTask(WD)
    batch = data.head(N).columns
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(task.loss(model, batch), (logits[:, 0] - batch["labels"]) ** 2)
    for route in ("cg", "ekfac"):
        inf = datatrace.InfluenceFunction(model, task, curvature=route, progress=False).fit(data)
        values = inf.score(data.head(2)).values
        assert values.shape == (2, N) and torch.isfinite(values).all() and values.abs().amax() > 0


def test_a_multi_label_model_is_refused_with_a_fix_that_works(transformers):
    model = bert_classifier(transformers, num_labels=3, problem_type="multi_label_classification")
    data = encoded((torch.rand(N, 3, generator=torch.Generator().manual_seed(1)) > 0.5).double())
    with pytest.raises(
        ValueError, match=r"problem_type='multi_label_classification'.*Fix: write a datatrace.Task"
    ):
        datatrace.InfluenceFunction(model, SequenceClassificationTask(WD), progress=False).fit(data)

    class MultiLabelTask(datatrace.Task):  # the fix, as the message words it
        def outputs(self, model, batch):
            return logits_of(model(**model_inputs(batch, "labels")))

        def loss_from_outputs(self, outputs, batch):
            return binary_cross_entropy_with_logits(outputs, batch["labels"], reduction="none").sum(dim=1)

    inf = datatrace.InfluenceFunction(model, MultiLabelTask(WD), curvature="cg", progress=False).fit(data)
    assert torch.isfinite(inf.score(data.head(2)).values).all()


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_an_encoder_decoder_model_is_refused_by_the_language_model_task(name, transformers):
    """BART ran before, silently: without labels it decodes its own input shifted, which CausalLMTask shifted again."""
    torch.manual_seed(0)
    if name == "t5":
        config = transformers.T5Config(
            vocab_size=V, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
            decoder_start_token_id=0,
        )  # fmt: skip
        model = transformers.T5ForConditionalGeneration(config)
    else:
        config = transformers.BartConfig(
            vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=16,
        )  # fmt: skip
        model = transformers.BartForConditionalGeneration(config)
    data = sequences(N, 0, None)
    with pytest.raises(
        ValueError, match=r"encoder-decoder model \(config.is_encoder_decoder\).*Fix: use a \*ForCausalLM"
    ):
        datatrace.InfluenceFunction(model, CausalLMTask(WD), progress=False).fit(data)
    with pytest.raises(ValueError, match=r"one label per token.*Fix: use datatrace.hf.CausalLMTask"):
        datatrace.InfluenceFunction(model, SequenceClassificationTask(WD), progress=False).fit(data)


def gpt2_classifier(transformers, pad_token_id: int | None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16, num_labels=3, pad_token_id=pad_token_id
    )
    return transformers.GPT2ForSequenceClassification(config).double().eval()


def test_left_padding_does_not_change_the_scores_of_a_decoder_only_classifier(transformers):
    model = gpt2_classifier(transformers, pad_token_id=0)
    task = SequenceClassificationTask(WD)
    results = []
    for pad in (None, "left", "right"):
        data = sequences(N, 0, pad)
        data.columns["labels"] = torch.arange(N) % 3
        inf = datatrace.InfluenceFunction(model, task, curvature="cg", progress=False).fit(data)
        results.append(inf.score(data.head(2)).values)
    plain = results[0]
    assert torch.isfinite(plain).all() and plain.abs().amax() > 0
    for padded in results[1:]:
        torch.testing.assert_close(padded, plain, rtol=1e-9, atol=1e-9 * float(plain.abs().amax()))


def test_a_decoder_only_classifier_without_a_padding_token_names_the_fix(transformers):
    data = encoded(torch.arange(N) % 3)
    model = gpt2_classifier(transformers, pad_token_id=None)
    with pytest.raises(ValueError, match=r"config.pad_token_id is None.*Fix: set model.config.pad_token_id"):
        datatrace.InfluenceFunction(model, SequenceClassificationTask(WD), progress=False).fit(data)


def test_token_parts_of_left_padded_sequences_sit_on_their_own_tokens(transformers):
    """Token-wise influence of left-padded training sequences: the parts sum to the scores, the padding and the
    first real token (predicted by nothing) carry none, and they equal the unpadded sequence's parts, shifted."""
    model = causal_lm(transformers, "gpt2", "sdpa")
    parts = []
    for pad in (None, "left"):
        inf = ROUTES["cg"](model).fit(sequences(N, 0, pad))
        query = sequences(2, 1, pad)
        split = token_influence(inf, query, [0, 1])
        torch.testing.assert_close(split.sum(dim=-1), inf.score(query).values[:, :2])
        parts.append(split)
    plain, left = parts
    assert left[..., : EXTRA + 1].abs().amax() == 0 and plain[..., 0].abs().amax() == 0
    torch.testing.assert_close(left[..., EXTRA:], plain, rtol=1e-9, atol=1e-9 * float(plain.abs().amax()))


def test_roberta_sequences_longer_than_its_offset_positions_are_named(transformers):
    """RoBERTa numbers positions from padding_idx + 1: 12 position embeddings hold 10 tokens, not 12."""
    torch.manual_seed(0)
    config = transformers.RobertaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=12, pad_token_id=1, num_labels=3,
    )  # fmt: skip
    model = transformers.RobertaForSequenceClassification(config).double().eval()
    task = SequenceClassificationTask(WD)
    for length in (10, 11):
        ids = torch.randint(2, V, (N, length), generator=torch.Generator().manual_seed(0))
        data = DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.arange(N) % 3)
        inf = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False)
        if length == 10:
            assert torch.isfinite(inf.fit(data).score(data.head(2)).values).all()
        else:
            with pytest.raises(
                ValueError, match=r"sequences of 11 tokens.*position embeddings for 10 tokens"
            ):
                inf.fit(data)


def test_a_label_column_under_another_name_is_named_with_the_tasks_own_argument(transformers):
    """``datasets`` names the column ``label``: the message names ``label_key=`` (not ``target_key=``) and works."""
    model = bert_classifier(transformers, num_labels=3)
    data = encoded(torch.arange(N) % 3)
    data.columns["label"] = data.columns.pop("labels")
    with pytest.raises(
        ValueError, match=r"label_key='labels'.*Fix: pass SequenceClassificationTask\(label_key='label'\)"
    ):
        datatrace.InfluenceFunction(
            model, SequenceClassificationTask(WD), curvature="ekfac", progress=False
        ).fit(data)
    task = SequenceClassificationTask(WD, label_key="label")
    inf = datatrace.InfluenceFunction(model, task, curvature="ekfac", progress=False).fit(data)
    assert torch.isfinite(inf.score(data.head(2)).values).all()
