"""The documented example docs/examples/gpt2_completion.py, run for real at its small setting (``--small``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from datatrace.hf import CausalLMTask

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "gpt2_completion.py"


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("gpt2_completion", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(example):
    return example.main(["--small", "--top", "4"])


def test_the_example_attributes_the_completion_with_the_default_curvature(result):
    scores, influence = result["scores"], result["influence"]
    n = len(result["documents"])
    assert scores.values.shape == (1, n) and torch.isfinite(scores.values).all()
    assert scores.values.abs().amax() > 0
    assert influence.curvature == "auto" and influence.params is None  # nothing hand-picked
    info = influence.curvature_.info
    assert scores.metadata["route"] == "auto" and info["auto_choice"] and info["auto_reason"]
    # the query measures -log p(completion | prompt) of the fitted model
    model, query = influence.fitted_model, result["query"]
    ids = torch.cat([result["prompt"], result["completion"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], dim=-1)
    start = len(result["prompt"])
    expected = -sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
    with torch.no_grad():
        measured = float(CausalLMTask().measurement(model, query)[0])
    assert measured == pytest.approx(expected, rel=1e-9)
    # the shown documents are the strongest proponents, in order
    top = result["top"]
    assert torch.equal(top, scores.values[0].topk(len(top)).indices)
    assert bool((scores.values[0, top[:-1]] >= scores.values[0, top[1:]]).all())


def test_the_token_parts_sum_to_the_scores_and_padding_carries_nothing(result):
    parts, top, scores = result["token_parts"], result["top"], result["scores"].values[0]
    assert parts.shape[0] == len(top) and torch.isfinite(parts).all()
    torch.testing.assert_close(parts.sum(-1), scores[top], rtol=1e-8, atol=1e-12 * float(scores.abs().max()))
    mask = result["influence"].training_data.get(top.tolist())["attention_mask"]
    assert bool((parts[:, 0] == 0).all())  # the first token is predicted by nothing
    assert bool((parts[:, : mask.shape[1]][mask == 0] == 0).all())  # padding carries no influence
    assert bool((parts[:, : mask.shape[1]][:, 1:][mask[:, 1:] == 1] != 0).any())


def test_the_printed_rows_mark_the_strongest_tokens(example, result, capsys):
    vocab, docs = result["vocab"], result["documents"]
    length = result["influence"].training_data.get([0])["input_ids"].shape[1]
    assert len(vocab) <= 100 and all(0 < len(d) < length for d in docs)  # <bos> + words fit the length
    i, row = int(result["top"][0]), result["token_parts"][0]
    line = example.marked(docs[i], row, 3)
    assert line.count("[[") == 3
    strongest = int(row.abs().argmax())
    assert f"[[{[example.BOS, *docs[i]][strongest]} {float(row[strongest]):+.3g}]]" in line
