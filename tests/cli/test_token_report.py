"""Token-wise influence in the HTML report: every token escaped in its own span, the colour's sign following the
part's sign, the numbers on hover, parts that do not add up to the example's score refused by name, and the
ranked sections showing the highlights for rows that carry them."""

from __future__ import annotations

import html
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datatrace.cli.explain import run_explain
from datatrace.cli.main import main
from datatrace.cli.render import add_ranked_section, attach_token_parts
from datatrace.cli.report import TOKEN_SUM_RTOL, Report, token_highlight_html

EVIL = "<script>alert('x')</script>"
SPAN = re.compile(
    r'<span class="tok (pos|neg|zero)"(?: style="background: rgba\(([^)]*)\)")? title="([^"]*)">(.*?)</span>',
    re.S,
)


def spans(fragment: str) -> list[tuple[str, str, str, str]]:
    return SPAN.findall(fragment)


def test_every_token_is_escaped_in_its_own_span_and_colour_follows_the_sign():
    tokens = ["The", " cat", EVIL, ' "sat"', " & ran", "\n"]
    values = [0.02, -0.01, 0.005, 0.0, -0.04, 0.001]
    fragment = token_highlight_html(tokens, values, score=sum(values), units="nats", caption=EVIL)
    assert "<script>" not in fragment and "alert('x')" not in fragment
    found = spans(fragment)
    assert [html.unescape(text) for _, _, _, text in found] == tokens
    for (kind, rgba, title, _), value in zip(found, values):
        assert kind == ("pos" if value > 0 else "neg" if value < 0 else "zero")
        if value > 0:
            assert rgba.startswith("47, 109, 181,")  # blue
        elif value < 0:
            assert rgba.startswith("192, 57, 43,")  # red
        else:
            assert rgba == ""  # no background: no influence through this token
        assert f"{value:+.4g} nats" in html.unescape(title)
    # strength is |part| / largest |part|: the largest (-0.04) at full opacity, 0.02 at half of it
    alphas = {v: float(r.split(",")[-1]) for (_, r, _, _), v in zip(found, values) if r}
    assert alphas[-0.04] == pytest.approx(0.6) and alphas[0.02] == pytest.approx(0.3, abs=1e-3)
    # the share of the score is in the hover text; the caption is escaped; the legend explains both colours
    assert "% of the example&#x27;s score" in fragment
    assert html.escape(EVIL) in fragment
    assert "blue, solid underline" in fragment and "red, dashed underline" in fragment
    # a given scale makes several examples comparable: every part then weaker
    weaker = token_highlight_html(tokens, values, scale=0.08, legend=False)
    assert "tok-legend" not in weaker
    got = [float(r.split(",")[-1]) for _, r, _, _ in spans(weaker) if r]
    assert got == pytest.approx([0.6 * abs(v) / 0.08 for v in values if v], abs=1e-3)


def test_parts_that_do_not_add_up_to_the_score_are_refused_by_name():
    tokens, values = ["a", "b", "c"], [0.1, 0.2, -0.05]
    token_highlight_html(tokens, values, score=0.25 * (1 + TOKEN_SUM_RTOL / 10))  # rounding is accepted
    with pytest.raises(
        ValueError, match=r"values=.*add up to the example's score 0\.3; they add up to 0\.25.*Fix"
    ):
        token_highlight_html(tokens, values, score=0.3)
    with pytest.raises(
        ValueError, match=r"values=.*one part per token: 3 tokens but 4 values.*Fix: pass values\[:len"
    ):
        token_highlight_html(tokens, [*values, 0.0])
    with pytest.raises(ValueError, match=r"tokens\[1\]=2 is not allowed: expected a str.*Fix"):
        token_highlight_html(["a", 2, "c"], values)
    with pytest.raises(ValueError, match=r"tokens='abc'.*sequence of token strings.*Fix"):
        token_highlight_html("abc", values)
    with pytest.raises(ValueError, match=r"values=.*finite.*Fix"):
        token_highlight_html(tokens, [0.1, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"scale=0 is not allowed: expected a number > 0.*Fix"):
        token_highlight_html(tokens, values, scale=0)
    with pytest.raises(ValueError, match=r"score='x' is not allowed.*Fix"):
        token_highlight_html(tokens, values, score="x")


def test_report_block_is_self_contained():
    report = Report("tokens").add_token_influence(["x", "y"], [0.5, -0.5], score=0.0, units="nats")
    text = report.to_html()
    assert (
        text.count('class="tok pos"') == 2 and text.count('class="tok neg"') == 2
    )  # tokens + legend swatches
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    assert "<script" not in text and "url(" not in text and "@import" not in text


def _rows():
    return [
        {"index": 4, "label": "lm", "score": 0.3, "text": "the cat sat"},
        {"index": 9, "label": "lm", "score": -0.1, "text": "a <b>dog</b>"},
    ]


def test_attach_token_parts_checks_each_row_by_name():
    rows = attach_token_parts(_rows(), {9: (["a", " <b>dog</b>"], np.array([-0.04, -0.06]))})
    assert rows[1]["tokens"] == ["a", " <b>dog</b>"] and rows[1]["token_scores"] == [-0.04, -0.06]
    assert "tokens" not in rows[0] and "tokens" not in _rows()[1]  # copies, the rest unchanged
    with pytest.raises(
        ValueError, match=r"token_parts\[4\]: values=.*add up to the example's score 0\.3.*Fix"
    ):
        attach_token_parts(_rows(), {4: (["the", " cat", " sat"], [0.1, 0.1, 0.2])})
    with pytest.raises(ValueError, match=r"token_parts=.*keys \[7\].*indices of the rows shown.*Fix"):
        attach_token_parts(_rows(), {7: (["x"], [0.1])})
    with pytest.raises(ValueError, match=r"token_parts\[4\]=.*a pair \(tokens, parts\).*Fix"):
        attach_token_parts(_rows(), {4: [0.3]})


def test_ranked_section_shows_the_tokens_of_the_rows_that_carry_them():
    texts = ["the cat sat"] * 5 + ["x"] * 4 + ["a <b>dog</b>"]
    spec = SimpleNamespace(
        kind="text", image_shape=None, texts={"train": texts}, text=lambda split, i: texts[int(i)]
    )
    rows = attach_token_parts(
        _rows(), {4: (["the", " cat", " sat"], [0.1, 0.25, -0.05]), 9: (["a", " <b>dog</b>"], [-0.04, -0.06])}
    )
    report = Report("explain")
    add_ranked_section(
        report,
        spec,
        rows,
        value_key="score",
        title="Top 2 examples of query #0",
        value_format=lambda x: f"{x:+.3g} nats",
        columns=[("score", "score (nats)")],
        caption="Top",
        units="nats",
    )
    text = report.to_html()
    assert "Token-wise influence of the top 2 examples of query #0" in text
    assert text.count('<div class="tokens"') == 2 and text.count('class="tok-legend"') == 1
    assert "&lt;b&gt;dog&lt;/b&gt;" in text and "<b>dog</b>" not in text
    # one colour scale for the section: the largest part (0.25) at full strength, the -0.06 at 0.6 * 0.06 / 0.25
    assert "rgba(47, 109, 181, 0.600)" in text and "rgba(192, 57, 43, 0.144)" in text
    # without token parts nothing is added
    plain = Report("plain")
    add_ranked_section(
        plain, spec, _rows(), value_key="score", title="T", value_format=str, columns=[], caption="c"
    )
    assert '<div class="tokens"' not in plain.to_html()


NEXT_TOKEN_SPEC = '''
import torch
import datatrace
from datatrace.verification.training import fit_full_batch

V, T = 4, 5
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, V, (24, T), generator=g)
ids[:, 1:] = torch.where(torch.rand(24, T - 1, generator=g) < 0.7, (ids[:, :-1] + 1) % V, ids[:, 1:])
X = torch.nn.functional.one_hot(ids, V).double()
WORDS = ["a", " <b>", " c", " d&"]
kind = "text"
texts = {"train": ["".join(WORDS[int(t)] for t in row) for row in ids]}
texts["query"] = texts["train"][:3]


class NextToken(datatrace.Task):
    """Summed next-token cross-entropy of a bigram model; term t predicts token t from token t - 1 (0 at t = 0)."""

    def loss_terms(self, model, batch):
        x, y = batch
        logits = model(x)[:, :-1].reshape(-1, V)
        terms = torch.nn.functional.cross_entropy(logits, y[:, 1:].reshape(-1), reduction="none")
        terms = terms.reshape(y.shape[0], -1)
        return torch.cat([torch.zeros_like(terms[:, :1]), terms], dim=1)

    def loss(self, model, batch):
        return self.loss_terms(model, batch).sum(dim=1)


def train():
    return X, ids

def query():
    return X[:3], ids[:3]

def task():
    return NextToken(weight_decay=0.05)

def model():
    torch.manual_seed(0)
    return fit_full_batch(torch.nn.Linear(V, V).double(), task(), (X, ids))
'''


def test_explain_shows_token_wise_influence_of_a_next_token_model(tmp_path):
    """End to end: run_explain(tokens=...) on a task with loss_terms splits each shown score over its tokens
    (token_influence), writes the parts to results.json and highlights them, escaped, in the report."""

    spec = tmp_path / "bigram.py"
    spec.write_text(NEXT_TOKEN_SPEC)
    words = ["a", " <b>", " c", " d&"]
    g = torch.Generator().manual_seed(0)  # the spec's ids, rebuilt
    ids = torch.randint(0, 4, (24, 5), generator=g)
    ids[:, 1:] = torch.where(torch.rand(24, 4, generator=g) < 0.7, (ids[:, :-1] + 1) % 4, ids[:, 1:])
    asked = []

    def tokens(i):
        asked.append(i)
        return [words[int(t)] for t in ids[i]]

    out = tmp_path / "out"
    results = run_explain(
        spec, out, k=2, query_indices=[1], progress=False, stream=io.StringIO(), tokens=tokens
    )
    query = results["queries"][0]
    shown = query["proponents"] + query["opponents"]
    assert shown and sorted(asked) == sorted(r["index"] for r in shown)
    for row in shown:
        assert row["tokens"] == [words[int(t)] for t in ids[row["index"]]]
        assert sum(row["token_scores"]) == pytest.approx(row["score"], rel=1e-8, abs=1e-12)
        assert row["token_scores"][0] == 0.0  # the first token is predicted by nothing
    assert json.loads((out / "results.json").read_text())["queries"][0]["proponents"][0]["token_scores"]
    text = (out / "report.html").read_text()
    assert text.count('<div class="tokens"') == len(shown)
    assert "&lt;b&gt;</span>" in text and "<b>" not in text and " d&amp;</span>" in text


def test_explain_refuses_tokens_for_a_task_without_loss_terms(tmp_path):
    spec = tmp_path / "bigram.py"
    spec.write_text(
        NEXT_TOKEN_SPEC.replace("def loss_terms(", "def _terms(").replace("self.loss_terms(", "self._terms(")
    )
    with pytest.raises(
        ValueError, match=r"tokens=.*needs a task that splits its loss by token.*NextToken has none.*Fix"
    ):
        run_explain(spec, tmp_path / "o", k=1, query_indices=[0], progress=False, tokens=lambda i: ["a"])


def test_the_spec_files_tokens_function_is_used_by_the_cli(tmp_path, capsys):
    """A spec that defines tokens(i) gets token-wise influence from the command line (`datatrace explain SPEC`),
    with no Python call; a tokens that is not a function is named."""
    spec = tmp_path / "bigram.py"
    spec.write_text(
        NEXT_TOKEN_SPEC
        + """

def tokens(i):
    return [WORDS[int(t)] for t in ids[i]]
"""
    )
    out = tmp_path / "out"
    assert main(["explain", str(spec), "--out", str(out), "--k", "2", "--query-index", "0", "--quiet"]) == 0
    query = json.loads((out / "results.json").read_text())["queries"][0]
    for row in query["proponents"] + query["opponents"]:
        assert len(row["tokens"]) == 5
        assert sum(row["token_scores"]) == pytest.approx(row["score"], rel=1e-8, abs=1e-12)
    assert '<div class="tokens"' in (out / "report.html").read_text()
    bad = tmp_path / "bad.py"
    bad.write_text(NEXT_TOKEN_SPEC + "\ntokens = ['a']\n")
    assert main(["explain", str(bad), "--out", str(tmp_path / "bad-out"), "--quiet"]) != 0
    assert re.search(r"tokens.*expected a function tokens\(i\)", capsys.readouterr().err)
