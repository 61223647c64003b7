"""The commands on spec files with Hugging Face models: dict batches from a tokenizer and the ready tasks of
datatrace.hf, with no ``params=`` anywhere.

A one-layer BERT classifier (its embeddings frozen, as when fine-tuning the top of a pretrained model) and a
one-layer GPT-2 built from their configs (no download), trained a few Adam steps inside the spec, as a user would.
"""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
from pathlib import Path

import pytest
import torch

from datatrace.cli.main import main
from datatrace.cli.spec import load_spec
from datatrace.errors import SpecError

torch.set_num_threads(1)
pytest.importorskip("transformers")

FAST = ["--quiet", "--threads", "1"]

COMMON = """
import torch
import transformers
import datatrace
from datatrace.hf import CausalLMTask, SequenceClassificationTask

transformers.logging.set_verbosity_error()
g = torch.Generator().manual_seed(0)
N, T, V = 24, 6, 50
ids = torch.randint(1, V, (N, T), generator=g)
mask = torch.ones(N, T, dtype=torch.long)
mask[::3, -2:] = 0
ids = ids * mask


class Dicts(torch.utils.data.Dataset):
    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(self.columns["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def adam(model, batch, steps=25):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
"""

BERT = """
# the label: whether the first token is odd (learnable from the first position)
labels = ids[:, 0] % 2
class_names = ["even", "odd"]
texts = {"train": [f"tokens {row[:3]}" for row in ids[:16].tolist()],
         "query": [f"tokens {row[:3]}" for row in ids[16:].tolist()]}


def task():
    return SequenceClassificationTask(weight_decay=1e-2)


def train():
    return Dicts(input_ids=ids[:16], attention_mask=mask[:16], labels=labels[:16])


def query():
    return Dicts(input_ids=ids[16:], attention_mask=mask[16:], labels=labels[16:])


def model():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, num_labels=2, max_position_embeddings=16)
    net = transformers.BertForSequenceClassification(config)
    for parameter in net.bert.embeddings.parameters():  # frozen: outside the scope of influence
        parameter.requires_grad_(False)
    return adam(net, {"input_ids": ids[:16], "attention_mask": mask[:16], "labels": labels[:16]})
"""

GPT2 = """
def task():
    return CausalLMTask(weight_decay=1e-2)


def train():
    return Dicts(input_ids=ids[:16], attention_mask=mask[:16])


def query():
    return Dicts(input_ids=ids[16:], attention_mask=mask[16:])


def model():
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V,
                                                               n_positions=16))
    return adam(net, {"input_ids": ids[:16], "attention_mask": mask[:16],
                      "labels": ids[:16].masked_fill(mask[:16] == 0, -100)})
"""


def write(tmp_path: Path, body: str, name: str = "spec.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(COMMON) + textwrap.dedent(body))
    return path


def run_main(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def trainable_names(spec_path: Path) -> list[str]:
    model = load_spec(spec_path).model
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_explain_a_bert_classifier_on_dict_batches(tmp_path):
    spec = write(tmp_path, BERT)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["explain", spec, "--out", out, "--k", "3", "--query-index", "0", *FAST])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["units"] == "nats"
    query = results["queries"][0]
    labels = ["even", "odd"]
    assert query["label"] in labels and query["predicted"] in labels and query["text"].startswith("tokens")
    rows = query["proponents"] + query["opponents"]
    assert rows and all(r["label"] in labels and "text" in r for r in rows)
    scores = [r["score"] for r in rows]
    assert all(s == s and abs(s) < float("inf") for s in scores)  # finite
    # the scope is every trainable parameter (the route chosen by auto covers them all here), never the frozen
    # embeddings
    influence = results["influence"]
    assert influence["curvature_route"]
    assert influence["params_in_scope"] == trainable_names(spec)
    assert not any("embeddings" in name for name in influence["params_in_scope"])
    assert query["label"] in stdout and "report.html" in stdout
    trainable = results["spec"]["num_trainable_params"]
    assert 0 < trainable < results["spec"]["num_params"] and f"{trainable:,} trainable" in stdout


def test_a_tokenizer_output_with_ekfac_covers_the_trainable_linear_layers(tmp_path):
    """``train()`` returning a dict of columns (a tokenizer's BatchEncoding with labels); EK-FAC's default scope
    is the trainable parameters of its supported layers, the LayerNorms named as left out."""
    body = BERT.replace(
        "return Dicts(input_ids=ids[:16], attention_mask=mask[:16], labels=labels[:16])",
        "return transformers.BatchEncoding({'input_ids': ids[:16], 'attention_mask': mask[:16], "
        "'labels': labels[:16]})",
    )
    spec = write(tmp_path, body)
    out = tmp_path / "out"
    code, _, stderr = run_main(["explain", spec, "--out", out, "--k", "2", "--curvature", "ekfac", *FAST])
    assert code == 0, stderr
    influence = json.loads((out / "results.json").read_text())["influence"]
    assert influence["curvature_route"] == "ekfac"
    in_scope, left_out = influence["params_in_scope"], influence["params_left_out"]
    trainable = trainable_names(spec)
    assert sorted(in_scope + list(left_out)) == sorted(trainable)  # frozen embeddings: in neither
    assert in_scope and all(
        name.endswith(("weight", "bias")) and "LayerNorm" not in name for name in in_scope
    )
    assert left_out and all("LayerNorm" in name for name in left_out)


def test_explain_and_debug_a_gpt2_language_model(tmp_path):
    spec = write(tmp_path, GPT2)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["explain", spec, "--out", out, "--k", "3", *FAST])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["units"].startswith("nats")
    query = results["queries"][0]
    assert query["label"] == "—" and "predicted" not in query  # a sequence has no class label
    assert query["loss"] > 0
    influence = results["influence"]
    in_scope, left_out = influence["params_in_scope"], influence["params_left_out"]
    assert sorted(in_scope + list(left_out)) == sorted(trainable_names(spec))
    # a layer-structured route (auto's EK-FAC on the supported layers) names the rest, with reasons
    if left_out:
        assert influence["curvature_route"] == "ekfac" and all(left_out.values())
        assert any("wte" in name for name in left_out)  # the token embedding (GPT-2's lm_head shares it)
    scores = [r["score"] for r in query["proponents"] + query["opponents"]]
    assert scores and all(abs(s) < float("inf") for s in scores)
    # the language model's loss is the summed negative log-likelihood: the default query is the highest-loss one
    assert "nats" in stdout

    out = tmp_path / "debug"
    code, _, stderr = run_main(["debug", spec, "--out", out, *FAST])
    assert code == 0, stderr
    assert (out / "report.html").exists() and (out / "per_example.csv").exists()


def test_token_ids_outside_the_vocabulary_name_the_value_and_the_fix(tmp_path):
    body = GPT2.replace("return Dicts(input_ids=ids[16:], attention_mask=mask[16:])",
                        "return Dicts(input_ids=ids[16:] + V, attention_mask=mask[16:])")  # fmt: skip
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, body))
    message = str(info.value)
    assert "model() and query() do not fit together" in message
    assert "outside the vocabulary" in message and f"0..{50 - 1}" in message and "Fix:" in message


def test_a_tuple_of_tensors_for_a_hugging_face_task_says_to_pass_dicts(tmp_path):
    body = BERT.replace(
        "return Dicts(input_ids=ids[:16], attention_mask=mask[:16], labels=labels[:16])",
        "return ids[:16], labels[:16]",
    )
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, body))
    message = str(info.value)
    assert "model() and train() do not fit together" in message
    assert "dict batches" in message and "Fix:" in message


def test_memorisation_audit_reads_the_labels_of_dict_batches(tmp_path):
    spec = write(tmp_path, BERT)
    out = tmp_path / "out"
    code, _, stderr = run_main(["audit", spec, "--memorisation", "--out", out, *FAST])
    assert code == 0, stderr
    memorisation = json.loads((out / "results.json").read_text())["memorisation"]
    assert all(row["label"] in ("even", "odd") for row in memorisation["flagged"])
    # a prediction-flip check ran on each flagged example (it needs their class labels)
    assert all("prediction_flip" in row for row in memorisation["flagged"])
