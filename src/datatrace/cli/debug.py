"""``datatrace debug SPEC``: find mislabelled, atypical and harmful training examples, and check by retraining.

With :func:`datatrace.apps.debug.debug_data`:

* **the most suspicious examples**, ranked by ``--rank-by`` (:data:`datatrace.apps.debug.RANKINGS`): the
  **training loss** (default, :data:`datatrace.apps.debug.DEFAULT_RANKING`: nothing measured beat it on every
  realistic model, ``benchmarks/bench_mislabel.py``), **self-influence** (the estimated rise of an example's own loss
  if it were removed and the model retrained) or the **leave-one-out loss** (their sum: the example's estimated
  loss under the model retrained without it). Loss and self-influence are reported for every example.
* with ``validation()``: **validation influence**, the estimated change of the *total* validation loss if the
  example were removed. Negative = removing it would lower the validation loss: a harmful example.
* with ``--flagged FILE`` (indices of known-bad examples, e.g. labels flipped on purpose): how fast each ranking
  finds them (:func:`datatrace.apps.debug.detection_summary`), against the training loss and a random order.
* with ``train_fn(subset)`` and ``validation()``: the counterfactual check
  (:func:`datatrace.apps.debug.removal_check`): retrain without the ``--remove-k`` most harmful examples and
  without as many random ones, and compare the actual validation loss.
"""

from __future__ import annotations

import argparse
import logging
import os
import textwrap
import time
from typing import Any, TextIO

import numpy as np

from datatrace.apps.debug import DEFAULT_RANKING, RANKINGS, debug_data, detection_summary, removal_check
from datatrace.cli.context import (
    SPEC_WARNING,
    add_common_arguments,
    add_top_flag,
    check_int,
    run_command,
    start,
)
from datatrace.cli.files import read_flagged, write_csv
from datatrace.cli.render import (
    add_ranked_section,
    add_timings,
    conventions,
    example_records,
    format_rows,
    setup_table,
)
from datatrace.cli.report import Report, plot_bars, plot_detection_curve, plot_histogram
from datatrace.cli.verification import (
    add_verification,
    add_verify_argument,
    check_verify,
    split_scores,
    summary_lines,
    verify_scores,
)
from datatrace.errors import SpecError, UsageError
from datatrace.verification.metrics import detection_curve

logger = logging.getLogger("datatrace.cli.debug")

HELP = "find mislabelled, atypical and harmful training examples (training loss, self-influence, validation harm)"
DESCRIPTION = (
    "Load SPEC, fit influence functions on train() and rank every training example by its training loss (default), "
    "its self-influence (the estimated rise of its own loss if removed) or their sum, the leave-one-out loss "
    "(--rank-by), all high for mislabelled or atypical examples, and, with validation(), by its estimated effect on the total validation loss if removed (negative: harmful). With "
    "--flagged FILE, measure how many known-bad examples each ranking finds. With train_fn(subset), retrain "
    "without the --remove-k most harmful examples and without as many random ones, and compare the actual "
    "validation loss. Writes report.html, results.json and per_example.csv to --out." + " " + SPEC_WARNING
)
FRACTIONS = (0.05, 0.1, 0.2)
#: how each ranking is named in the outputs
WHAT = {
    "training_loss": "training loss",
    "self_influence": "self-influence",
    "loo_loss": "leave-one-out loss",
}
#: why the default ranks by the loss, said wherever the ranking is shown
WHY_LOSS = (
    "Ranked by the training loss: on networks trained with Adam on digits with 10% of the labels flipped, no "
    "self-influence route found more of the flips than the training loss on every model "
    "(benchmarks/bench_mislabel.py, benchmarks/README.md). Where the model fits many of its wrong labels (long "
    "training), K-FAC / EK-FAC self-influence found a few more: try --rank-by loo_loss --curvature ekfac."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``datatrace debug``."""
    add_common_arguments(parser, "debug")
    parser.add_argument(
        "--flagged",
        default=None,
        metavar="FILE",
        help="training indices known to be bad (e.g. flipped labels): one integer per line, or a JSON list, or "
        "a .npy array; reports how many each ranking finds in its top 5%%, 10%%, 20%%.",
    )
    parser.add_argument(
        "--remove-k",
        type=int,
        default=None,
        metavar="K",
        help="retrain without the K most harmful examples (needs train_fn and validation in the spec; default: "
        "5%% of the training set when the spec has them; 0: skip the check).",
    )
    parser.add_argument(
        "--n-random",
        type=int,
        default=3,
        metavar="N",
        help="random removals of K examples to compare the harmful removal with (default: 3).",
    )
    parser.add_argument(
        "--rank-by",
        default=DEFAULT_RANKING,
        choices=sorted(RANKINGS),
        help="what the most suspicious examples are ranked by (default: %(default)s: nothing measured beat it on "
        "every realistic network; self_influence: the estimated rise of the example's own loss if removed; "
        "loo_loss: their sum, the example's estimated loss under the model retrained without it).",
    )
    add_top_flag(parser, 20, "examples listed per ranking in the report")
    add_verify_argument(parser)


def run(args: argparse.Namespace) -> int:
    """``datatrace debug``: run :func:`run_debug` with the parsed flags."""
    return run_command(
        run_debug,
        args,
        flagged=args.flagged,
        remove_k=args.remove_k,
        n_random=args.n_random,
        rank_by=args.rank_by,
        top=args.top,
        verify=args.verify,
    )


def run_debug(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "datatrace-debug",
    *,
    flagged: str | os.PathLike[str] | None = None,
    remove_k: int | None = None,
    n_random: int = 3,
    rank_by: str = DEFAULT_RANKING,
    top: int = 20,
    verify: int = 0,
    curvature: str | None = None,
    damping: Any = None,
    seed: int = 0,
    progress: bool = True,
    stream: TextIO | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Debug the training data of the spec at ``spec_path``; returns the JSON-ready results."""
    top = check_int("--top", top, 1)
    n_random = check_int("--n-random", n_random, 0)
    verify = check_verify(verify)
    if rank_by not in RANKINGS:
        raise UsageError(
            f"--rank-by {rank_by!r} is not allowed: expected one of {sorted(RANKINGS)}. Fix: pass e.g. "
            f"--rank-by {DEFAULT_RANKING}."
        )
    if remove_k is not None:
        check_int("--remove-k", remove_k, 0)
    ctx = start(
        "debug",
        spec_path,
        out_dir,
        needs=("debug",),
        curvature=curvature,
        damping=damping,
        seed=seed,
        progress=progress,
        stream=stream,
        threads=threads,
    )
    spec, units = ctx.spec, ctx.spec.units
    n = spec.n("train")
    mask = read_flagged(flagged, n) if flagged is not None else None
    has_val = spec.has("validation")
    can_remove = spec.train_fn is not None and has_val
    if remove_k is None:
        remove_k = max(1, round(0.05 * n)) if can_remove else 0
        if not can_remove:
            logger.info(
                "no retraining check: the spec needs train_fn(subset) and validation() for it (--remove-k)"
            )
    elif remove_k > 0:
        spec.require("debug --remove-k")
    if remove_k >= n:
        raise UsageError(
            f"--remove-k {remove_k} must be smaller than the {n} training examples. Fix: pass fewer."
        )

    influence = ctx.fit()
    logger.info(
        "ranking %d training examples by %s%s", n, WHAT[rank_by], " and validation harm" if has_val else ""
    )
    t0 = time.perf_counter()
    result = debug_data(
        influence, validation=spec.influence_data("validation") if has_val else None, rank_by=rank_by
    )
    ctx.timings["debug_seconds"] = time.perf_counter() - t0

    detection = None
    curves: dict[str, Any] = {}
    if mask is not None:
        detection = detection_summary(result, mask, FRACTIONS)
        for name in sorted(detection["rankings"], key=lambda k: k != rank_by):  # the ranking used first
            if name in WHAT:
                curves[WHAT[name]] = detection_curve(result.values(name), mask)
        if result.validation_influence is not None:
            curves["validation harm"] = detection_curve(-result.validation_influence, mask)

    check = None
    if remove_k:
        logger.info(
            "retraining without the %d most harmful and %d x %d random training examples (train_fn)",
            remove_k,
            n_random,
            remove_k,
        )
        t0 = time.perf_counter()
        try:
            check = removal_check(
                spec.retrain_fn(),
                spec.encoded("train"),
                spec.loss_metric("validation"),
                result.harmful_order,
                remove_k,
                n_random=n_random,
                random_state=seed,
                metric_name=f"mean validation loss ({units})",
            )
        except (SpecError, UsageError):
            raise
        except Exception as err:
            raise RuntimeError(
                f"spec {spec.path}: the retraining check failed while calling train_fn(subset): "
                f"{type(err).__name__}: {err}. Fix: check that train_fn accepts a subset in the form train() "
                "returns and returns the trained model, or pass --remove-k 0 to skip the check."
            ) from err
        ctx.timings["retrain_seconds"] = time.perf_counter() - t0

    split = "validation" if has_val else spec.query_split
    query_data, query_scores, query_rows = split_scores(ctx, split, verify)
    verification, arrays = verify_scores(
        ctx,
        verify,
        query_data,
        query_scores,
        what=f"the score rows of {len(query_rows)} {split}() example(s) (the change of each one's loss, in "
        f"{units}, if a training example is removed), from which the validation influence is summed"
        if query_rows
        else "debug's scores need validation() or query() examples whose loss to measure, and the spec has neither",
        queries=query_rows,
    )

    # -- outputs -----------------------------------------------------------------------------------------------
    columns: dict[str, Any] = {
        "index": np.arange(n),
        "label": spec.label_texts("train"),
        "self_influence": result.self_influence,
        "training_loss": result.training_loss,
    }
    if result.validation_influence is not None:
        columns["validation_influence"] = result.validation_influence
    if mask is not None:
        columns["flagged"] = mask.astype(int)
    per_example_path = ctx.defer("per_example.csv", lambda path: write_csv(path, columns))

    def rows(order: np.ndarray) -> list[dict[str, Any]]:
        out = example_records(spec, "train", order[:top].tolist())
        for r in out:
            i = r["index"]
            r["self_influence"] = float(result.self_influence[i])
            r["training_loss"] = float(result.training_loss[i])
            if rank_by == "loo_loss":
                r["loo_loss"] = float(result.training_loss[i] + result.self_influence[i])
            if result.validation_influence is not None:
                r["validation_influence"] = float(result.validation_influence[i])
            if mask is not None:
                r["flagged"] = bool(mask[i])
        return out

    suspicious = rows(result.suspicious_order)
    harmful = rows(result.harmful_order) if result.harmful_order is not None else None
    val_inf = result.validation_influence
    results = ctx.results_header()
    results.update(
        {
            "meaning": result.meaning,
            "units": units,
            "influence": ctx.influence_summary(),
            "n_train": n,
            "ranked_by": rank_by,
            "ranking": RANKINGS[rank_by],
            "ranking_note": WHY_LOSS if rank_by == "training_loss" else None,
            "ranking_values": _stats(result.values(rank_by)),
            "training_loss": _stats(result.training_loss),
            "self_influence": _stats(result.self_influence),
            "suspicious": suspicious,
            "validation": None
            if val_inf is None
            else {
                "n_validation": spec.n("validation"),
                "n_harmful": int((val_inf < 0).sum()),
                "sum_of_negative_values": float(val_inf[val_inf < 0].sum()),
                "sum_of_positive_values": float(val_inf[val_inf > 0].sum()),
            },
            "harmful": harmful,
            "detection": detection,
            "flagged_file": None if flagged is None else str(flagged),
            "removal_check": None if check is None else check.to_dict(),
            "files": {"per_example": str(per_example_path)},
            "verification": verification,
        }
    )
    report = _report(ctx, results, result, mask, curves, check, arrays)
    return ctx.finish(results, report, "\n".join([_summary(ctx, results), *summary_lines(verification)]))


def _report(
    ctx: Any,
    results: dict[str, Any],
    result: Any,
    mask: np.ndarray | None,
    curves: dict[str, Any],
    check: Any,
    arrays: Any = None,
) -> Any:
    spec, units = ctx.spec, ctx.spec.units
    n = results["n_train"]
    ranked = results["ranked_by"]
    report = Report(
        f"datatrace debug: {spec.name}",
        f"{n} training examples ranked by {WHAT[ranked]}"
        + (" and by their harm to the validation loss" if result.validation_influence is not None else "")
        + f", seed {ctx.seed}.",
    )
    report.add_heading("What the numbers mean")
    report.add_paragraph(
        f"The training loss of example i (in {units}) is its loss under the trained model: a mislabelled example "
        "disagrees with what the model learnt from the rest, so its loss is high. "
        f"Self-influence of training example i estimates how much its own loss (in {units}) would rise if it were "
        "removed and the model retrained: the model fits a mislabelled or atypical example mostly by memorising "
        "it, so these rank high too. Validation influence of i estimates the change of the TOTAL validation loss "
        f"(sum over validation examples, in {units}) if i were removed: negative = removing i would lower the "
        "validation loss, so i is harmful; positive = i is helpful. "
        + conventions(units, "validation example")
    )
    report.add_key_values(setup_table(ctx), caption="Set-up")
    add_verification(report, results["verification"], arrays, units)
    flag_label = "flagged in --flagged"

    report.add_heading(f"Most suspicious: highest {WHAT[ranked]}")
    if results["ranking_note"]:
        report.add_paragraph(results["ranking_note"])
    values = result.values(ranked)
    marks = {"median": float(np.median(values))}
    if results["suspicious"]:
        marks[f"top {len(results['suspicious'])}"] = results["suspicious"][-1][ranked]
    report.add_figure(
        plot_histogram(
            values,
            title=f"{WHAT[ranked].capitalize()} of every training example",
            xlabel={
                "training_loss": f"its loss under the trained model ({units})",
                "self_influence": f"estimated rise of its own loss if removed ({units})",
                "loo_loss": f"its estimated loss under the model retrained without it ({units})",
            }[ranked],
            marks=marks,
            log=True,
        ),
        "A long right tail holds the examples the model disagrees with or could only fit by memorising them.",
    )
    _show(report, spec, results["suspicious"], ranked, units, WHAT[ranked], mask, flag_label)

    if results["harmful"] is not None:
        v = results["validation"]
        report.add_heading("Most harmful to the validation loss")
        report.add_paragraph(
            f"{v['n_harmful']} of {n} training examples have a negative validation influence: removing any one of "
            f"them is estimated to lower the total loss of the {v['n_validation']} validation examples. Removing "
            f"all of them together would change it by about {v['sum_of_negative_values']:.4g} {units} to first "
            "order (the sum; check large sets by retraining, below)."
        )
        _show(
            report,
            spec,
            results["harmful"],
            "validation_influence",
            units,
            "validation influence",
            mask,
            flag_label,
            title="Most harmful training examples",
            xlabel=f"change of the total validation loss if removed ({units})",
            bar_caption="Red bars: removing the example would lower the validation loss.",
        )

    if results["detection"] is not None:
        det = results["detection"]
        report.add_heading("Finding the flagged examples")
        report.add_paragraph(
            f"{det['n_flagged']} of {n} training examples are flagged in {results['flagged_file']}. Each ranking "
            "is inspected from the top; the table gives how many flagged examples are found in its first 5%, 10% "
            "and 20%, and the area under its detection curve (random order: 0.5)."
        )
        names = list(det["rankings"])
        report.add_table(
            [
                [name.replace("_", " ")]
                + [det["rankings"][name]["found_count"][str(f)] for f in det["fractions"]]
                + [det["rankings"][name]["auc"]]
                for name in names
            ],
            ["ranking"] + [f"found in top {100 * f:.0f}%" for f in det["fractions"]] + ["AUC"],
            caption=f"Flagged examples found (of {det['n_flagged']})",
        )
        report.add_figure(
            plot_detection_curve(
                curves,
                title="Finding the flagged examples",
                flagged_fraction=det["n_flagged"] / n,
                ylabel="fraction of flagged examples found",
            ),
            "Dotted verticals at 5% and 10% inspected.",
        )

    if check is not None:
        c = results["removal_check"]
        report.add_heading("Counterfactual check: retraining without the most harmful examples")
        mean_random = c["metric_after_random_mean"]
        report.add_paragraph(
            f"The model was retrained with the spec's train_fn on all {n} examples, without the {c['k']} most "
            f"harmful ones (most negative validation influence), and without {c['k']} random ones "
            f"({len(c['metric_after_random'])} draws). Lower validation loss is better."
        )
        table = [
            ["all training examples", c["metric_before"], 0.0],
            [f"without the {c['k']} most harmful", c["metric_after_harmful"], check.change_harmful],
        ]
        for j, value in enumerate(c["metric_after_random"]):
            table.append([f"without {c['k']} random (draw {j + 1})", value, value - c["metric_before"]])
        report.add_table(table, ["retrained on", c["metric_name"], "change"], caption="Actual retraining")
        labels = [r[0] for r in table[1:]]
        report.add_figure(
            plot_bars(
                [r[2] for r in table[1:]],
                labels,
                title="Actual change of the validation loss after retraining",
                xlabel=f"change of the mean validation loss ({units}); negative = better",
            ),
            "Removing harmful examples should lower the validation loss more than removing random ones"
            + (
                "."
                if mean_random is None
                else f" (random mean change {mean_random - c['metric_before']:+.4g})."
            ),
        )
    return add_timings(report, ctx)


def _show(
    report: Any,
    spec: Any,
    rows: list[dict[str, Any]],
    key: str,
    units: str,
    what: str,
    mask: np.ndarray | None,
    flag_label: str,
    *,
    title: str = "",
    xlabel: str | None = None,
    bar_caption: str = "",
) -> None:
    """A ranking: a bar plot of ``key`` (with ``xlabel``), the top examples and their table."""
    if not rows:
        return
    columns = [("self_influence", f"self-influence ({units})"), ("training_loss", f"training loss ({units})")]
    if key == "loo_loss":
        columns.insert(0, ("loo_loss", f"leave-one-out loss ({units})"))
    if "validation_influence" in rows[0]:
        columns.append(("validation_influence", f"validation influence ({units})"))
    if mask is not None:
        columns.append(("flagged", "flagged"))
    add_ranked_section(
        report,
        spec,
        rows,
        value_key=key,
        title=title,
        xlabel=xlabel,
        bar_caption=bar_caption,
        examples_title=lambda shown: f"Top {shown} by {what}",
        value_format=lambda x: f"{what} {x:.3g} {units}",
        columns=columns,
        caption=f"Top {len(rows)} by {what}",
        max_tabular=10,
        highlight_key="flagged",
        highlight_label=flag_label,
    )


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "max": float(values.max())}


def _summary(ctx: Any, r: dict[str, Any]) -> str:
    spec, units = ctx.spec, ctx.spec.units
    lines = [
        f"datatrace debug: {spec.path} ({r['n_train']} training examples)",
        "",
        f"Training loss: an example's loss (in {units}) under the trained model. Self-influence: how much its",
        "own loss would rise if it were removed and the model retrained. Both are high for mislabelled or",
        "atypical examples. Validation influence: the change of the total validation loss if it were removed;",
        "negative = harmful (removing it would lower it).",
        "",
    ]
    ranked = r["ranked_by"]
    if r["ranking_note"]:
        lines += [*textwrap.wrap(r["ranking_note"], 110, break_on_hyphens=False), ""]
    lines.append(
        f"Most suspicious (highest {WHAT[ranked]}; median {r['ranking_values']['median']:.3g} {units}):"
    )
    columns = [
        ("index", "train index", ""),
        ("label", "label", ""),
        ("training_loss", "training loss", ".4g"),
        ("self_influence", "self-influence", ".4g"),
    ]
    if r["harmful"] is not None:
        columns.append(("validation_influence", "validation infl.", "+.4g"))
    if r["detection"] is not None:
        columns.append(("flagged", "flagged", ""))
    lines += format_rows(r["suspicious"][:10], columns, "  ")
    if r["harmful"] is not None:
        v = r["validation"]
        lines += [
            "",
            f"{v['n_harmful']} training examples are estimated to be harmful to the {v['n_validation']} validation "
            f"examples (their values add up to {v['sum_of_negative_values']:.4g} {units}). Most harmful:",
        ]
        lines += format_rows(r["harmful"][:10], columns, "  ")
    if r["detection"] is not None:
        det = r["detection"]
        lines += [
            "",
            f"Finding the {det['n_flagged']} flagged examples (found in the top 5% / 10% / 20%, AUC):",
        ]
        for name, entry in det["rankings"].items():
            counts = " / ".join(
                f"{entry['found_count'][str(f)]:.0f}"
                if name != "random"
                else f"{entry['found_count'][str(f)]:.1f}"
                for f in det["fractions"]
            )
            lines.append(f"  {name.replace('_', ' '):>16}: {counts}   AUC {entry['auc']:.3f}")
    if r["removal_check"] is not None:
        c = r["removal_check"]
        lines += [
            "",
            f"Actual retraining ({c['metric_name']}): {c['metric_before']:.4g} with all examples, "
            f"{c['metric_after_harmful']:.4g} without the {c['k']} most harmful, "
            f"{c['metric_after_random_mean']:.4g} without {c['k']} random (mean of {len(c['metric_after_random'])})."
            if c["metric_after_random"]
            else f"Actual retraining ({c['metric_name']}): {c['metric_before']:.4g} with all examples, "
            f"{c['metric_after_harmful']:.4g} without the {c['k']} most harmful.",
        ]
    return "\n".join(lines)
