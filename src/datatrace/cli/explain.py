"""``datatrace explain SPEC``: which training examples made the model predict this, and by how much.

For each chosen query (``--query-index``; default: the misclassified query with the highest loss, or the
highest-loss query when none is misclassified) it lists the ``--k`` strongest proponents and opponents with
:func:`datatrace.apps.explain.explain`. ``score[q, i]`` estimates ``loss_q(theta without i) - loss_q(theta_hat)``:
positive = training example i helped the query (removing it would raise the query's loss), negative = it hurt.

The report shows the query beside its proponents and opponents: pictures for images, a feature table (one column
per example, the query's first) for tabular data, the texts for text. With the spec's ``tokens(i)`` or ``tokens=`` (the
token strings of a training example) on a task that splits its loss by token (``loss_terms``, e.g.
:class:`datatrace.hf.CausalLMTask`), it also shows each proponent's and opponent's score split over its tokens
(:func:`datatrace.apps.tokens.token_influence`) as highlighted text, and writes the parts to results.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from datatrace.apps.explain import explain
from datatrace.apps.tokens import token_influence
from datatrace.cli.context import (
    SPEC_WARNING,
    add_common_arguments,
    add_top_flag,
    check_int,
    run_command,
    start,
)
from datatrace.cli.render import (
    add_ranked_bars,
    add_ranked_section,
    add_timings,
    attach_token_parts,
    conventions,
    example_records,
    format_rows,
    setup_table,
)
from datatrace.cli.report import Report
from datatrace.cli.spec_model import take
from datatrace.cli.verification import (
    add_verification,
    add_verify_argument,
    check_verify,
    summary_lines,
    verify_scores,
)
from datatrace.errors import UsageError, bad_value

logger = logging.getLogger("datatrace.cli.explain")

HELP = "explain predictions by their most helpful and most harmful training examples"
DESCRIPTION = (
    "Load SPEC, fit influence functions on its train() data and explain queries of query() (or validation()). A "
    "score estimates how much the query's loss (in nats for classification) would change if that training "
    "example were removed and the model retrained: proponents (positive) helped the query, opponents (negative) "
    "pushed it toward its error. Default query: the misclassified one with the highest loss. Writes report.html "
    "and results.json to --out." + " " + SPEC_WARNING
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``datatrace explain``."""
    add_common_arguments(parser, "explain")
    parser.add_argument(
        "--query-index",
        type=int,
        nargs="+",
        default=None,
        metavar="I",
        help="row(s) of query() to explain (default: the misclassified query with the highest loss).",
    )
    add_top_flag(parser, 5, "proponents and opponents to show per query", flag="--k", metavar="K")
    add_verify_argument(parser)


def run(args: argparse.Namespace) -> int:
    """``datatrace explain``: run :func:`run_explain` with the parsed flags."""
    return run_command(run_explain, args, query_indices=args.query_index, k=args.k, verify=args.verify)


def _default_queries(spec: Any, split: str) -> tuple[list[int], str]:
    preds = spec.predictions(split)
    correct = preds.correct
    if correct is not None and (~correct).any():
        wrong = np.flatnonzero(~correct)
        return [int(wrong[np.argmax(preds.loss[wrong])])], "the misclassified query with the highest loss"
    why = "the query with the highest loss" + (" (none is misclassified)" if correct is not None else "")
    return [int(np.argmax(preds.loss))], why


def run_explain(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "datatrace-explain",
    *,
    query_indices: list[int] | None = None,
    k: int = 5,
    verify: int = 0,
    curvature: str | None = None,
    damping: Any = None,
    seed: int = 0,
    progress: bool = True,
    stream: TextIO | None = None,
    threads: int | None = None,
    tokens: Callable[[int], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Explain queries of the spec at ``spec_path``; returns the JSON-ready results (also in results.json).

    ``tokens(i)``: the token strings of training example ``i``, one per loss term of the task's
    ``loss_terms(model, batch)`` (e.g. ``tokenizer.convert_ids_to_tokens(ids)`` for
    :class:`datatrace.hf.CausalLMTask`); when given, each proponent's and opponent's score is split over its
    tokens (:func:`datatrace.apps.tokens.token_influence`, parts adding up to the score), shown as highlighted
    text in the report and written as ``tokens`` / ``token_scores`` of its record."""
    check_int("--k", k, 1, "Fix: pass e.g. --k 5.")
    if tokens is not None and not callable(tokens):
        raise bad_value(
            "tokens", tokens, "expected a function train index -> token strings", "pass a callable"
        )
    verify = check_verify(verify)
    ctx = start(
        "explain",
        spec_path,
        out_dir,
        needs=("explain",),
        curvature=curvature,
        damping=damping,
        seed=seed,
        progress=progress,
        stream=stream,
        threads=threads,
    )
    spec = ctx.spec
    if tokens is None and spec.tokens is not None:  # the spec file's tokens(i)
        tokens = spec.tokens
    if tokens is not None and not callable(getattr(spec.task, "loss_terms", None)):
        raise bad_value(
            "tokens",
            tokens,
            f"token-wise influence needs a task that splits its loss by token, loss_terms(model, batch) -> (batch, "
            f"terms); {type(spec.task).__name__} has none",
            "use datatrace.hf.CausalLMTask (or add loss_terms to your task), or leave tokens out",
        )
    split = spec.query_split
    n_query = spec.n(split)
    if query_indices:
        bad = [i for i in query_indices if not -n_query <= i < n_query]
        if bad:
            raise UsageError(
                f"--query-index {bad[0]} is out of range: {split}() has {n_query} examples. Fix: pass an index "
                f"between 0 and {n_query - 1}."
            )
        chosen = list(dict.fromkeys(int(i) % n_query for i in query_indices))
        chosen_as = "chosen with --query-index"
    else:
        chosen, chosen_as = _default_queries(spec, split)
    influence = ctx.fit()
    units = spec.units
    logger.info("explaining %d %s example(s) with the top %d proponents and opponents", len(chosen), split, k)
    t0 = time.perf_counter()
    query_data = take(spec.influence_data(split), chosen)
    explanations = explain(influence, query_data, k=k)
    ctx.timings["explain_seconds"] = time.perf_counter() - t0
    verification, arrays = verify_scores(
        ctx,
        verify,
        query_data,
        np.stack([np.asarray(e.score_row, dtype=np.float64) for e in explanations]),
        what=f"the scores of the {len(chosen)} explained {split}() example(s) ({units} of their loss)",
        queries=chosen,
    )
    preds = spec.predictions(split)
    queries = []
    for row_of_query, (explanation, q) in enumerate(zip(explanations, chosen)):
        pro, opp = explanation.proponents, explanation.opponents
        row = explanation.score_row
        entry: dict[str, Any] = {
            "query_index": q,
            "split": split,
            "label": spec.label_text(split, q),
            "loss": float(preds.loss[q]),
            "chosen_as": chosen_as,
            "proponents": example_records(spec, "train", pro.indices.tolist(), pro.values.tolist()),
            "opponents": example_records(spec, "train", opp.indices.tolist(), opp.values.tolist()),
            "sum_of_positive_scores": float(row[row > 0].sum()),
            "sum_of_negative_scores": float(row[row < 0].sum()),
            "measurement": explanation.measurement,
        }
        if preds.predicted is not None:
            entry["predicted"] = spec.class_name(int(preds.predicted[q]))
            entry["confidence"] = float(preds.confidence[q])
            entry["misclassified"] = bool(not preds.correct[q])
        text = spec.text(split, q)
        if text is not None:
            entry["text"] = text
        if tokens is not None:
            _add_token_parts(influence, take(query_data, [row_of_query]), entry, tokens)
        queries.append(entry)

    results = ctx.results_header()
    results.update(
        {
            "meaning": explanations[0].meaning if explanations else conventions(units),
            "units": units,
            "query_split": split,
            "k": k,
            "influence": ctx.influence_summary(),
            "queries": queries,
            "verification": verification,
        }
    )
    report = _report(ctx, queries, verification, arrays)
    return ctx.finish(results, report, "\n".join([_summary(ctx, queries), *summary_lines(verification)]))


def _add_token_parts(
    influence: Any, query: Any, entry: dict[str, Any], tokens: Callable[[int], Sequence[str]]
) -> None:
    """Token-wise parts (``token_influence``) of the proponents and opponents of ``entry``, the query ``query``,
    attached to their records (the task splits its loss by token, ``loss_terms``: checked by run_explain)."""
    shown = [row["index"] for row in entry["proponents"] + entry["opponents"]]
    if not shown:
        return
    parts = token_influence(influence, query, shown)[0].detach().cpu().numpy()  # (len(shown), T)
    given = {}
    for j, i in enumerate(shown):
        names = list(tokens(i))
        if len(names) > parts.shape[1]:
            raise bad_value(
                f"tokens({i})",
                f"{len(names)} tokens",
                f"one token per loss term: training example {i} has {parts.shape[1]} terms at most",
                "return the tokens of the model's input sequence for that example",
            )
        given[i] = (names, parts[j, : len(names)])
    for key in ("proponents", "opponents"):
        mine = {row["index"]: given[row["index"]] for row in entry[key]}
        entry[key] = attach_token_parts(entry[key], mine)


def _query_caption(q: dict[str, Any]) -> str:
    text = f"query #{q['query_index']}: {q['label']}"
    if "predicted" in q:
        text += f"\npredicted {q['predicted']} ({100 * q['confidence']:.0f}%)"
    return text


def _report(ctx: Any, queries: list[dict[str, Any]], verification: Any = None, arrays: Any = None) -> Any:
    spec, units = ctx.spec, ctx.spec.units
    report = Report(
        f"datatrace explain: {spec.name}",
        f"{len(queries)} {queries[0]['split'] if queries else ''} example(s) explained by their most helpful and "
        f"most harmful training examples, seed {ctx.seed}.",
    )
    report.add_heading("What the numbers mean")
    report.add_paragraph(conventions(units))
    report.add_key_values(setup_table(ctx), caption="Set-up")
    add_verification(report, verification, arrays, units)
    for q in queries:
        qi = q["query_index"]
        title = f"Query #{qi}"
        if q.get("misclassified"):
            title += f": a {q['label']} predicted as {q['predicted']}"
        report.add_heading(title)
        words = f"Query #{qi} of {q['split']}() has label {q['label']} and loss {q['loss']:.4g} {units}"
        if "predicted" in q:
            words += f"; the model predicts {q['predicted']} with probability {q['confidence']:.3f}"
        words += f" ({q['chosen_as']}). "
        words += (
            "Proponents: removing one would RAISE this loss by about its score (they pulled the model toward the "
            "label). Opponents: removing one would LOWER the loss by about |score| (they pushed it away). "
            f"All positive scores add up to {q['sum_of_positive_scores']:.4g} {units}, all negative ones to "
            f"{q['sum_of_negative_scores']:.4g} {units}."
        )
        report.add_paragraph(words)
        pro, opp = q["proponents"], q["opponents"]
        rows = pro + opp
        if rows:
            add_ranked_bars(
                report,
                rows,
                "score",
                title=f"Top proponents (blue) and opponents (red) of query #{qi}",
                xlabel=f"change of the query's loss if removed ({units})",
                caption="Each bar: the estimated change of the query's loss if that training example were removed "
                "and the model retrained.",
            )
        for name, group in (("proponents", pro), ("opponents", opp)):
            if not group:
                report.add_paragraph(
                    f"No training example has a {'positive' if name == 'proponents' else 'negative'} score."
                )
                continue
            add_ranked_section(
                report,
                spec,
                group,
                value_key="score",
                title=f"Top {len(group)} {name} of query #{qi}",
                value_format=lambda x: f"{x:+.3g} {units}",
                columns=[("score", f"score ({units})")],
                caption=f"Top {name}",
                query=(q["split"], qi, _query_caption(q)),
                units=units,
            )
    return add_timings(report, ctx)


def _summary(ctx: Any, queries: list[dict[str, Any]]) -> str:
    spec, units = ctx.spec, ctx.spec.units
    desc = spec.describe()
    lines = [
        f"datatrace explain: {spec.path}",
        f"  model: {desc['model']} ({desc['backend']}, {desc['num_params']:,} parameters"
        + (
            f", {desc['num_trainable_params']:,} trainable"
            if desc["num_trainable_params"] != desc["num_params"]
            else ""
        )
        + "); "
        + ", ".join(f"{n} {s} examples" for s, n in desc["sizes"].items()),
        "",
        f"What a score means: how much the query's loss (in {units}) would change if that training example",
        "were removed and the model retrained. Positive: it helped the query (proponent). Negative: it hurt it",
        "(opponent).",
    ]
    columns = [("index", "train index", ""), ("label", "label", ""), ("score", f"score ({units})", "+.4g")]
    for q in queries:
        head = f"Query #{q['query_index']} (label {q['label']}"
        if "predicted" in q:
            head += f", predicted {q['predicted']} with probability {q['confidence']:.2f}"
        head += f"; loss {q['loss']:.3g} {units}; {q['chosen_as']}):"
        lines += ["", head, "  proponents (removing one would RAISE this loss by the score):"]
        lines += format_rows(q["proponents"], columns)
        lines.append("  opponents (removing one would LOWER this loss by |score|):")
        lines += format_rows(q["opponents"], columns)
    return "\n".join(lines)
