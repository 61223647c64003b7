"""``datatrace value SPEC``: what each training example is worth to the validation set, in validation-loss units.

With :func:`datatrace.apps.value.value_data`: ``value[i]`` estimates the change of the *total* validation loss if
training example ``i`` were removed and the model retrained (first-order leave-one-out). Positive = valuable
(removing it would raise the validation loss), negative = harmful. Values add up to first order: removing a set
changes the total validation loss by about the sum of its members' values.

Writes ``values.csv`` (or ``values.parquet``: columns ``index``, ``value``), ``report.html`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from typing import Any, TextIO

import numpy as np

from datatrace.apps.value import value_data
from datatrace.cli.context import (
    SPEC_WARNING,
    add_common_arguments,
    add_top_flag,
    check_int,
    run_command,
    start,
)
from datatrace.cli.render import add_ranked_section, add_timings, example_records, format_rows, setup_table
from datatrace.cli.report import Report, plot_histogram
from datatrace.cli.verification import (
    add_verification,
    add_verify_argument,
    check_verify,
    split_scores,
    summary_lines,
    verify_scores,
)
from datatrace.errors import UsageError

logger = logging.getLogger("datatrace.cli.value")

HELP = "value every training example by its effect on the validation loss (CSV or Parquet)"
DESCRIPTION = (
    "Load SPEC, fit influence functions on train() and value every training example by the estimated change of "
    "the total validation() loss if it were removed and the model retrained (in the loss's units, e.g. nats): "
    "positive = valuable (removing it would raise the validation loss), negative = harmful. Writes values.csv or "
    "values.parquet (columns index, value), report.html and results.json to --out." + " " + SPEC_WARNING
)
FORMATS = ("csv", "parquet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``datatrace value``."""
    add_common_arguments(parser, "value")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="csv",
        help="file format of the values (default: csv; parquet needs pyarrow or fastparquet).",
    )
    add_top_flag(parser, 10, "most valuable and most harmful examples shown")
    add_verify_argument(parser)


def run(args: argparse.Namespace) -> int:
    """``datatrace value``: run :func:`run_value` with the parsed flags."""
    return run_command(run_value, args, format=args.format, top=args.top, verify=args.verify)


def _parquet_available() -> bool:
    if importlib.util.find_spec("pyarrow") is not None:
        return True
    return (
        importlib.util.find_spec("fastparquet") is not None and importlib.util.find_spec("pandas") is not None
    )


def run_value(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "datatrace-value",
    *,
    format: str = "csv",
    top: int = 10,
    verify: int = 0,
    curvature: str | None = None,
    damping: Any = None,
    seed: int = 0,
    progress: bool = True,
    stream: TextIO | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Value the training data of the spec at ``spec_path``; returns the JSON-ready results."""
    if format not in FORMATS:
        raise UsageError(f"--format {format!r} is not allowed: expected one of {list(FORMATS)}.")
    if format == "parquet" and not _parquet_available():
        raise UsageError(
            "--format parquet needs pyarrow (or fastparquet with pandas), and neither is installed. Fix: "
            "pip install pyarrow, or use --format csv."
        )
    check_int("--top", top, 1)
    verify = check_verify(verify)
    ctx = start(
        "value",
        spec_path,
        out_dir,
        needs=("value",),
        curvature=curvature,
        damping=damping,
        seed=seed,
        progress=progress,
        stream=stream,
        threads=threads,
    )
    spec, units = ctx.spec, ctx.spec.units
    influence = ctx.fit()
    n_val = spec.n("validation")
    logger.info("valuing %d training examples on %d validation examples", spec.n("train"), n_val)
    t0 = time.perf_counter()
    values = value_data(influence, spec.influence_data("validation"))
    ctx.timings["value_seconds"] = time.perf_counter() - t0
    path = ctx.defer(f"values.{format}", values.to_csv if format == "csv" else values.to_parquet)
    query_data, query_scores, query_rows = split_scores(ctx, "validation", verify)
    verification, arrays = verify_scores(
        ctx,
        verify,
        query_data,
        query_scores,
        what=f"the score rows of {len(query_rows)} validation() example(s) (the change of each one's loss, in "
        f"{units}, if a training example is removed), whose sums are the values",
        queries=query_rows,
    )
    v = values.values
    k = min(top, len(v))
    best = values.most_valuable(k)
    worst = values.most_harmful(k)
    by_label: dict[str, dict[str, Any]] = {}
    if spec.is_classifier:
        labels = spec.label_texts("train")
        for name in dict.fromkeys(labels):
            members = np.asarray([lab == name for lab in labels])
            by_label[name] = {
                "n": int(members.sum()),
                "total": float(v[members].sum()),
                "mean": float(v[members].mean()),
                "n_negative": int((v[members] < 0).sum()),
            }
    results = ctx.results_header()
    results.update(
        {
            "meaning": values.meaning,
            "units": units,
            "influence": ctx.influence_summary(),
            "n_train": len(v),
            "n_validation": n_val,
            "summary": {
                "total": float(v.sum()),
                "mean": float(v.mean()),
                "median": float(np.median(v)),
                "min": float(v.min()),
                "max": float(v.max()),
                "n_negative": int((v < 0).sum()),
                "sum_of_negative_values": float(v[v < 0].sum()),
            },
            "by_label": by_label or None,
            "most_valuable": example_records(spec, "train", best.tolist(), v[best], "value"),
            "most_harmful": example_records(spec, "train", worst.tolist(), v[worst], "value"),
            "format": format,
            "files": {"values": str(path)},
            "verification": verification,
        }
    )
    summary = "\n".join([_summary(ctx, results), *summary_lines(verification)])
    return ctx.finish(results, _report(ctx, results, v, arrays), summary)


def _report(ctx: Any, r: dict[str, Any], v: np.ndarray, arrays: Any = None) -> Any:
    spec, units = ctx.spec, ctx.spec.units
    s = r["summary"]
    report = Report(
        f"datatrace value: {spec.name}",
        f"{r['n_train']} training examples valued on {r['n_validation']} validation examples, seed {ctx.seed}.",
    )
    report.add_heading("What the numbers mean")
    report.add_paragraph(
        f"value[i] estimates the change of the TOTAL validation loss (the sum over the {r['n_validation']} "
        f"validation examples, in {units}) if training example i were removed and the model retrained "
        "(first-order leave-one-out). Positive = valuable: removing i would raise the validation loss. Negative = "
        "harmful: removing i would lower it. Values add up to first order: removing a set changes the total "
        "validation loss by about the sum of its members' values (check large sets by retraining)."
    )
    report.add_key_values(setup_table(ctx), caption="Set-up")
    add_verification(report, r["verification"], arrays, units)
    report.add_heading("Distribution")
    report.add_key_values(
        {
            f"sum of all values ({units})": s["total"],
            f"mean value ({units})": s["mean"],
            f"median value ({units})": s["median"],
            "examples with a negative value (harmful)": s["n_negative"],
            f"sum of the negative values ({units})": s["sum_of_negative_values"],
            "file": r["files"]["values"],
        },
        caption="Values",
    )
    report.add_figure(
        plot_histogram(
            v,
            title="Value of every training example",
            xlabel=f"change of the total validation loss if removed ({units})",
            marks={"0": 0.0},
            log=True,
        ),
        "Left of 0: harmful examples; right of 0: valuable ones.",
    )
    if r["by_label"]:
        report.add_table(
            [[name, e["n"], e["total"], e["mean"], e["n_negative"]] for name, e in r["by_label"].items()],
            ["label", "examples", f"sum of values ({units})", f"mean value ({units})", "harmful"],
            caption="Values by training label",
        )
    for key, title in (("most_valuable", "Most valuable"), ("most_harmful", "Most harmful")):
        report.add_heading(title)
        add_ranked_section(
            report,
            spec,
            r[key],
            value_key="value",
            title=f"{title} training examples",
            xlabel=f"change of the total validation loss if removed ({units})",
            bar_caption=f"{title} examples with their values.",
            value_format=lambda x: f"{x:+.3g} {units}",
            columns=[("value", f"value ({units})")],
            caption=title,
            max_tabular=10,
        )
    return add_timings(report, ctx)


def _summary(ctx: Any, r: dict[str, Any]) -> str:
    units = ctx.spec.units
    s = r["summary"]
    columns = [("index", "train index", ""), ("label", "label", ""), ("value", f"value ({units})", "+.4g")]
    lines = [
        f"datatrace value: {ctx.spec.path} ({r['n_train']} training examples, {r['n_validation']} validation)",
        "",
        f"A value is the change of the total validation loss (in {units}) if that training example",
        "were removed and the model retrained. Positive: valuable (removing it would raise the loss). Negative:",
        "harmful.",
        "",
        f"  {s['n_negative']} harmful examples (values add up to {s['sum_of_negative_values']:.4g} {units}); "
        f"median value {s['median']:.3g} {units}",
        "Most valuable:",
        *format_rows(r["most_valuable"][:5], columns, "  "),
        "Most harmful:",
        *format_rows(r["most_harmful"][:5], columns, "  "),
    ]
    return "\n".join(lines)
