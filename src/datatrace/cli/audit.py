"""``datatrace audit SPEC --fairness --memorisation``: which training examples drive a gap between groups, and which
ones the model memorised.

* ``--fairness`` (:func:`datatrace.apps.audit.fairness_audit`): for the examples of ``query()`` (or
  ``validation()``) split in two by ``groups()``, the gap ``mean f(A) - mean f(B)`` of the loss or of the
  predicted probability of ``--positive-class`` (``--metric positive_rate``: e.g. an approval rate), and for every
  training example the estimated change of that gap if it were removed and the model retrained. The examples
  whose removal would shrink ``|gap|`` most are the ones that drive it.
* ``--memorisation`` (:func:`datatrace.apps.audit.memorisation_audit`): training examples whose self-influence
  (the rise of their own loss if removed) lies beyond the tail of its bulk (an upper-tail test on log
  self-influence with a stated false-positive rate, ``--false-positive-rate``), and whether removing one would flip
  its own prediction: the model gets it right only because it saw it. With ``--verify N``, up to ``N`` flagged
  examples are retrained without (:func:`datatrace.apps.audit.confirm_memorisation`): does their own loss rise as
  estimated?
* ``--verify N``: the scores of ``query()`` (or ``validation()``) are checked by retraining
  (:mod:`datatrace.cli.verification`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from typing import Any, TextIO

import numpy as np

from datatrace.apps.audit import (
    CONFIRM_SHARE,
    FALSE_POSITIVE_RATE,
    confirm_memorisation,
    fairness_audit,
    memorisation_audit,
)
from datatrace.cli.context import (
    SPEC_WARNING,
    add_common_arguments,
    add_top_flag,
    check_int,
    run_command,
    start,
)
from datatrace.cli.files import write_csv
from datatrace.cli.render import (
    add_ranked_section,
    add_timings,
    conventions,
    example_records,
    format_rows,
    setup_table,
)
from datatrace.cli.report import Report, plot_bars, plot_estimated_vs_actual, plot_histogram
from datatrace.cli.verification import (
    ModuleTrainFn,
    add_verification,
    add_verify_argument,
    cache_dir,
    check_verify,
    n_cached,
    split_scores,
    summary_lines,
    verify_scores,
)
from datatrace.errors import SpecError, UsageError

logger = logging.getLogger("datatrace.cli.audit")

HELP = "fairness audit (which training examples drive a gap between groups) and memorisation audit"
DESCRIPTION = (
    "Load SPEC and fit influence functions on train(). --fairness: the gap of the mean loss (or of the predicted "
    "probability of --positive-class, with --metric positive_rate) between the two groups of groups() over "
    "query() (or validation()), and for every training example the estimated change of that gap if it were "
    "removed and the model retrained: the examples whose removal would shrink the gap most drive it. "
    "--memorisation: training examples whose self-influence lies beyond the tail of its bulk (an upper-tail test "
    "with false-positive rate --false-positive-rate) and whether removing each would flip its own prediction; "
    "with --verify N, flagged examples are retrained without to confirm. Writes report.html, results.json and per_example.csv."
    + " "
    + SPEC_WARNING
)
METRICS = ("loss", "positive_rate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``datatrace audit``."""
    add_common_arguments(parser, "audit")
    parser.add_argument(
        "--fairness",
        action="store_true",
        help="audit the gap between the two groups of groups() (needs groups()).",
    )
    parser.add_argument(
        "--memorisation",
        "--memorization",
        action="store_true",
        help="flag memorised training examples by self-influence beyond the tail of its bulk.",
    )
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="loss",
        help="fairness: compare the mean loss (default) or the mean predicted probability of --positive-class.",
    )
    parser.add_argument(
        "--positive-class",
        type=int,
        default=1,
        metavar="C",
        help="fairness with --metric positive_rate: the class index whose rate is compared (default: 1).",
    )
    parser.add_argument(
        "--group-names",
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="fairness: the two groups to compare, gap = A - B (default: the two labels of groups(), sorted).",
    )
    parser.add_argument(
        "--false-positive-rate",
        type=float,
        default=FALSE_POSITIVE_RATE,
        metavar="P",
        help="memorisation: the probability that an ordinary example (one of the bulk of log self-influence) is "
        f"flagged; about P x n flags are expected by chance (default: {FALSE_POSITIVE_RATE:g}).",
    )
    add_top_flag(parser, 10, "examples listed per table in the report")
    add_verify_argument(parser)


def run(args: argparse.Namespace) -> int:
    """``datatrace audit``: run :func:`run_audit` with the parsed flags."""
    return run_command(
        run_audit,
        args,
        fairness=args.fairness,
        memorisation=args.memorisation,
        metric=args.metric,
        positive_class=args.positive_class,
        group_names=args.group_names,
        false_positive_rate=args.false_positive_rate,
        top=args.top,
        verify=args.verify,
    )


def _match_group_names(groups: np.ndarray, names: list[str] | None) -> tuple[Any, Any] | None:
    """The labels of ``groups`` whose text is ``names`` (so ``--group-names 0 1`` works for integer groups)."""
    if names is None:
        return None
    labels = {str(g): g for g in np.unique(groups).tolist()}
    missing = [name for name in names if name not in labels]
    if missing:
        raise UsageError(
            f"--group-names: {missing[0]!r} is not a group of groups(); the groups are {sorted(labels)[:20]}. "
            "Fix: pass two of those."
        )
    if names[0] == names[1]:
        raise UsageError("--group-names: the two groups must differ.")
    return labels[names[0]], labels[names[1]]


def run_audit(
    spec_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "datatrace-audit",
    *,
    fairness: bool = False,
    memorisation: bool = False,
    metric: str = "loss",
    positive_class: int = 1,
    group_names: list[str] | None = None,
    false_positive_rate: float = FALSE_POSITIVE_RATE,
    top: int = 10,
    verify: int = 0,
    curvature: str | None = None,
    damping: Any = None,
    seed: int = 0,
    progress: bool = True,
    stream: TextIO | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Audit the spec at ``spec_path``; returns the JSON-ready results."""
    if not fairness and not memorisation:
        raise UsageError("nothing to audit. Fix: pass --fairness, --memorisation or both.")
    if metric not in METRICS:
        raise UsageError(f"--metric {metric!r} is not allowed: expected one of {list(METRICS)}.")
    check_int("--top", top, 1)
    if not 0.0 < false_positive_rate < 1.0:
        raise UsageError(
            f"--false-positive-rate {false_positive_rate!r} is not allowed: expected a probability in (0, 1). Fix: "
            "pass e.g. --false-positive-rate 0.001."
        )
    verify = check_verify(verify)
    needs = ["audit --fairness"] if fairness else []
    ctx = start(
        "audit",
        spec_path,
        out_dir,
        needs=needs,
        curvature=curvature,
        damping=damping,
        seed=seed,
        progress=progress,
        stream=stream,
        threads=threads,
    )
    spec, units = ctx.spec, ctx.spec.units
    names = _match_group_names(spec.groups, group_names) if fairness else None
    if fairness and names is None and len(np.unique(spec.groups)) != 2:
        raise UsageError(
            f"groups() of {spec.path} has {len(np.unique(spec.groups))} groups "
            f"({np.unique(spec.groups).tolist()[:10]}); a gap compares two. Fix: pass --group-names A B."
        )
    if fairness and metric == "positive_rate" and not spec.is_classifier:
        raise UsageError(
            "--metric positive_rate needs a classifier (ClassificationTask). Fix: use --metric loss."
        )
    influence = ctx.fit()
    n = spec.n("train")
    labels = spec.label_texts("train")
    columns: dict[str, Any] = {"index": np.arange(n), "label": labels}
    results = ctx.results_header()
    results.update({"units": units, "influence": ctx.influence_summary(), "n_train": n})

    fair = None
    if fairness:
        split = spec.query_split
        logger.info("fairness audit: %s gap between groups over %d %s examples", metric, spec.n(split), split)
        t0 = time.perf_counter()
        try:
            fair = fairness_audit(
                influence,
                spec.influence_data(split),
                spec.groups,
                metric=metric,
                positive_class=int(positive_class),
                group_names=names,
            )
        except ValueError as err:  # a class index the model does not have: a bad flag (exit code 2)
            if str(err).startswith("positive_class="):
                raise UsageError(f"--positive-class {positive_class}: {err}") from err
            raise
        ctx.timings["fairness_seconds"] = time.perf_counter() - t0
        effect_units = units if metric == "loss" else "probability"
        k = min(top, n)
        widen = fair.drivers_increasing[:k]
        narrow = fair.drivers_decreasing[:k]
        results["fairness"] = {
            "meaning": fair.meaning,
            "split": split,
            "metric": metric,
            "measurement": fair.measurement,
            "positive_class": spec.class_name(int(positive_class)) if metric == "positive_rate" else None,
            "effect_units": effect_units,
            "group_names": [str(g) for g in fair.group_names],
            "group_values": list(fair.group_values),
            "group_sizes": list(fair.group_sizes),
            "gap": fair.gap,
            "n_widening": int(fair.drivers_increasing.size),
            "n_narrowing": int(fair.drivers_decreasing.size),
            "widening": example_records(spec, "train", widen.tolist(), fair.effect[widen], "effect"),
            "narrowing": example_records(spec, "train", narrow.tolist(), fair.effect[narrow], "effect"),
            "predicted_gap_without_top_widening": fair.predicted_gap_without(widen)
            if widen.size
            else fair.gap,
            "labels_of_top_widening": dict(Counter(labels[i] for i in widen.tolist())),
            "labels_of_train": dict(Counter(labels)),
        }
        columns["fairness_effect"] = fair.effect

    mem = None
    if memorisation:
        logger.info(
            "memorisation audit: self-influence beyond its bulk at false-positive rate %g",
            false_positive_rate,
        )
        t0 = time.perf_counter()
        mem = memorisation_audit(
            influence, false_positive_rate=false_positive_rate, check_flips=spec.is_classifier
        )
        ctx.timings["memorisation_seconds"] = time.perf_counter() - t0
        flagged_rows = example_records(spec, "train", mem.flagged[:top].tolist())
        for j, row in enumerate(flagged_rows):
            i = row["index"]
            row["self_influence"] = float(mem.self_influence[i])
            row["zscore"] = float(mem.zscores[i])
            row["pvalue"] = float(mem.pvalues[i])
            if mem.prediction_flip is not None:
                row["margin"] = float(mem.margin[j])
                row["estimated_own_margin_change"] = float(mem.estimated_own_margin_change[j])
                row["prediction_flip"] = bool(mem.prediction_flip[j])
        results["memorisation"] = {
            "meaning": (
                f"self_influence[i] estimates how much example i's own loss (in {units}) would rise if it were "
                "removed and the model retrained. The rule: zscore = (log self_influence - median) / (1.4826 MAD of "
                "log self_influence), pvalue its normal upper-tail probability; flagged when pvalue < "
                f"false_positive_rate = {mem.false_positive_rate:g}, i.e. self_influence > {mem.threshold:.3g} "
                f"{units}. An ordinary example (one of a log-normal bulk) is flagged with that probability, so about "
                f"{mem.expected_false_positives:.1f} flags are expected by chance. prediction_flip: removing the "
                "example would change its own predicted label (its margin changes sign): it is predicted right only "
                "because it was trained on."
            ),
            "false_positive_rate": mem.false_positive_rate,
            "threshold": mem.threshold,
            "expected_false_positives": mem.expected_false_positives,
            "log_median": mem.log_median,
            "log_scale": mem.log_scale,
            "median": float(np.median(mem.self_influence)),
            "n_flagged": int(mem.flagged.size),
            "flagged_indices": mem.flagged,
            "n_prediction_flips": None if mem.prediction_flip is None else int(mem.prediction_flip.sum()),
            "flagged": flagged_rows,
            "confirmation": _confirm(ctx, mem, verify),
        }
        columns["self_influence"] = mem.self_influence
        columns["self_influence_zscore"] = mem.zscores
        columns["self_influence_pvalue"] = mem.pvalues
    split = spec.query_split
    confirmation = (results.get("memorisation") or {}).get("confirmation") or {}
    stopped = confirmation.get("status") == "interrupted"  # Ctrl-C means stop: no further retraining
    query_data, query_scores, query_rows = split_scores(ctx, split, 0 if stopped else verify)
    verification, arrays = verify_scores(
        ctx,
        verify,
        query_data,
        query_scores,
        what=f"the score rows of {len(query_rows)} {split}() example(s) (the change of each one's loss, in {units}, "
        "if a training example is removed), from which the fairness effects are combined"
        if query_rows
        else "the audit's scores need query() or validation() examples whose loss to measure, and the spec has "
        "neither",
        queries=query_rows,
    )
    if stopped:
        verification = {
            "status": "interrupted",
            "verdict": None,
            "n_retrains_finished": 0,
            "reason": "not started: interrupted (Ctrl-C) while confirming memorised examples by retraining. Rerun "
            "the same command to resume.",
        }
    results["verification"] = verification
    results.setdefault("fairness", None)
    results.setdefault("memorisation", None)
    results["files"] = {
        "per_example": str(ctx.defer("per_example.csv", lambda path: write_csv(path, columns)))
    }
    summary = "\n".join([_summary(ctx, results), *summary_lines(verification)])
    return ctx.finish(results, _report(ctx, results, fair, mem, arrays), summary)


def _confirm(ctx: Any, mem: Any, verify: int) -> dict[str, Any] | None:
    """Retrain without up to ``verify`` flagged examples (``--verify``): does their own loss rise as estimated?"""
    spec = ctx.spec
    if not verify or not mem.flagged.size:
        return None
    if spec.train_fn is None:
        return {"status": "not verified", "reason": f"the spec {spec.path.name} defines no train_fn(subset)."}
    cache = cache_dir(ctx, verify, "memorisation", flagged=mem.flagged.tolist())
    logger.info("retraining without up to %d flagged examples to confirm them (cache %s)", verify, cache)
    t0 = time.perf_counter()
    try:
        result = confirm_memorisation(
            mem,
            ModuleTrainFn(spec.retrain_fn()),
            spec.encoded("train"),
            spec.task,
            n_retrains=verify,
            random_state=ctx.seed,
            cache_dir=cache,
            progress=ctx.progress,
        )
    except KeyboardInterrupt:
        finished = n_cached(cache)
        return {
            "status": "interrupted",
            "n_retrains_finished": finished,
            "reason": f"interrupted (Ctrl-C) after {finished} finished retraining run(s), all kept in {cache}: "
            "rerun the same command to resume.",
        }
    except (SpecError, UsageError):
        raise
    except Exception as err:
        raise RuntimeError(
            f"spec {spec.path}: confirming memorised examples failed while calling train_fn(subset): "
            f"{type(err).__name__}: {err}. Fix: check train_fn, or drop --verify."
        ) from err
    ctx.timings["confirm_seconds"] = time.perf_counter() - t0
    return {"status": "verified", **result.to_dict()}


def _report(ctx: Any, r: dict[str, Any], fair: Any, mem: Any, arrays: Any = None) -> Any:
    spec, units = ctx.spec, ctx.spec.units
    parts = [p for p, x in (("fairness", fair), ("memorisation", mem)) if x is not None]
    report = Report(
        f"datatrace audit: {spec.name}", f"{' and '.join(parts).capitalize()} audit, seed {ctx.seed}."
    )
    report.add_heading("What the numbers mean")
    report.add_paragraph(conventions(units))
    report.add_key_values(setup_table(ctx), caption="Set-up")
    add_verification(report, r["verification"], arrays, units)
    if fair is not None:
        f = r["fairness"]
        a, b = f["group_names"]
        eu = f["effect_units"]
        what = "loss" if f["metric"] == "loss" else f"predicted probability of {f['positive_class']}"
        report.add_heading("Fairness: which training examples drive the gap")
        report.add_paragraph(
            f"Over the {sum(f['group_sizes'])} examples of {f['split']}(), the mean {what} is "
            f"{f['group_values'][0]:.4g} in group {a} ({f['group_sizes'][0]} examples) and "
            f"{f['group_values'][1]:.4g} in group {b} ({f['group_sizes'][1]}): gap = {a} - {b} = {f['gap']:+.4g} "
            f"({eu}). effect[i] estimates gap(theta without i) - gap(theta_hat): how the gap would change if "
            "training example i were removed and the model retrained (first order). "
            f"{f['n_widening']} training examples widen |gap| (removing one would shrink it), {f['n_narrowing']} "
            f"narrow it. Removing the top {len(f['widening'])} together would move the gap to about "
            f"{f['predicted_gap_without_top_widening']:+.4g} (first order: the sum of their effects; check by "
            "retraining)."
        )
        report.add_figure(
            plot_bars(
                f["group_values"],
                [f"group {a} (n={f['group_sizes'][0]})", f"group {b} (n={f['group_sizes'][1]})"],
                title=f"Mean {what} by group",
                xlabel=f"mean {what}" + (f" ({units})" if f["metric"] == "loss" else ""),
            ),
            f"The gap is {f['gap']:+.4g}.",
        )
        for key, title, words in (
            ("widening", "Examples that drive the gap", "removing one would shrink |gap|"),
            ("narrowing", "Examples that reduce the gap", "removing one would widen |gap|"),
        ):
            rows = f[key]
            if not rows:
                report.add_paragraph(f"No training example {words.replace('one would', 'would')}.")
                continue
            add_ranked_section(
                report,
                spec,
                rows,
                value_key="effect",
                title=f"{title} ({words})",
                xlabel=f"change of the gap {a} - {b} if removed ({eu})",
                bar_caption=f"Top {len(rows)}: estimated change of the gap if each were removed and the model "
                "retrained.",
                value_format=lambda x: f"gap {x:+.3g}",
                columns=[("effect", f"change of the gap if removed ({eu})")],
                caption=title,
                max_tabular=8,
            )
        report.add_table(
            [
                [name, count, f["labels_of_top_widening"].get(name, 0)]
                for name, count in sorted(f["labels_of_train"].items())
            ],
            ["training label", "training examples", f"among the top {len(f['widening'])} gap drivers"],
            caption="Labels of the examples that drive the gap",
        )
    if mem is not None:
        m = r["memorisation"]
        report.add_heading("Memorisation: self-influence beyond the tail of its bulk")
        flips = (
            ""
            if m["n_prediction_flips"] is None
            else (
                f" For {m['n_prediction_flips']} of them, removing the example is estimated to flip its own predicted "
                "label: the model predicts it right only because it was trained on it."
            )
        )
        report.add_paragraph(
            f"Self-influence estimates how much an example's own loss (in {units}) would rise if it were removed "
            f"and the model retrained (median {m['median']:.3g} {units}). It spans decades, so the rule works on "
            "its logarithm: a normal distribution is fitted to the bulk (the median and 1.4826 x the median "
            "absolute deviation of log self-influence, which the tail does not move) and an example is flagged when "
            f"its upper-tail probability is below the false-positive rate {m['false_positive_rate']:g}, i.e. when "
            f"its self-influence exceeds {m['threshold']:.3g} {units}. An ordinary example is flagged with that "
            f"probability, so about {m['expected_false_positives']:.1f} of the {r['n_train']} would be flagged by "
            f"chance (on data without planted outliers the measured rate is at most this). {m['n_flagged']} are "
            f"flagged.{flips}"
        )
        report.add_figure(
            plot_histogram(
                np.log10(np.where(mem.self_influence > 0, mem.self_influence, np.nan)),
                title="Self-influence of every training example (log scale)",
                xlabel=f"log10 self-influence ({units})",
                marks={
                    "median": float(np.log10(max(m["median"], 1e-300))),
                    f"flagging threshold (false-positive rate {m['false_positive_rate']:g})": float(
                        np.log10(m["threshold"])
                    ),
                },
                log=True,
            ),
            "Examples right of the threshold are flagged.",
        )
        confirmation = m["confirmation"]
        if confirmation is not None:
            report.add_heading("Memorisation confirmed by retraining?", level=3)
            if confirmation["status"] != "verified":
                report.add_paragraph(f"Not confirmed: {confirmation['reason']}")
            else:
                report.add_paragraph(
                    f"The model was retrained without each of {confirmation['n_checked']} flagged examples (of "
                    f"{confirmation['n_flagged']}; a random sample when there are more), one at a time. "
                    f"{confirmation['n_confirmed']} of {confirmation['n_checked']} are confirmed: their own loss "
                    f"rose by at least {CONFIRM_SHARE:g} x the estimated rise. Median actual / estimated rise: "
                    f"{confirmation['median_actual_over_estimated']:.3g} (1 = as estimated)."
                )
                if confirmation["n_checked"] >= 2:
                    report.add_figure(
                        plot_estimated_vs_actual(
                            confirmation["estimated"],
                            confirmation["actual"],
                            title="Own loss of flagged examples: estimated vs actual rise",
                            xlabel=f"actual rise of its own loss when removed ({units})",
                            ylabel=f"self-influence ({units})",
                        ),
                        "One point per flagged example retrained without.",
                    )
        rows = m["flagged"]
        columns = [
            ("self_influence", f"self-influence ({units})"),
            ("zscore", "z of log self-influence"),
            ("pvalue", "upper-tail probability"),
        ]
        if rows and "prediction_flip" in rows[0]:
            columns += [
                ("margin", "own margin"),
                ("estimated_own_margin_change", "estimated margin change if removed"),
                ("prediction_flip", "prediction flips"),
            ]
        add_ranked_section(
            report,
            spec,
            rows,
            value_key="self_influence",
            title="Most memorised training examples",
            examples_title=lambda shown: f"Most memorised training examples (top {shown})",
            value_format=lambda x: f"{x:.3g} {units}",
            columns=columns,
            caption=f"Flagged examples (top {len(rows)} of {m['n_flagged']})",
            max_tabular=8,
            highlight_key="prediction_flip",
            highlight_label="its own prediction would flip if removed",
        )
    return add_timings(report, ctx)


def _summary(ctx: Any, r: dict[str, Any]) -> str:
    units = ctx.spec.units
    lines = [f"datatrace audit: {ctx.spec.path} ({r['n_train']} training examples)"]
    if r["fairness"] is not None:
        f = r["fairness"]
        a, b = f["group_names"]
        what = "loss" if f["metric"] == "loss" else f"predicted probability of {f['positive_class']}"
        lines += [
            "",
            f"Fairness: mean {what} over {f['split']}() is {f['group_values'][0]:.4g} for group {a} "
            f"(n={f['group_sizes'][0]}) and {f['group_values'][1]:.4g} for group {b} (n={f['group_sizes'][1]}): "
            f"gap {a} - {b} = {f['gap']:+.4g} ({f['effect_units']}).",
            "An effect is the change of that gap if the training example were removed and the model retrained.",
            f"{f['n_widening']} examples widen |gap| (removing one would shrink it). Top drivers:",
            *format_rows(
                f["widening"][:5],
                [("index", "train index", ""), ("label", "label", ""), ("effect", "effect on gap", "+.4g")],
                "  ",
            ),
            f"Removing the top {len(f['widening'])} together: gap about {f['predicted_gap_without_top_widening']:+.4g}"
            " (first order; check by retraining).",
        ]
    if r["memorisation"] is not None:
        m = r["memorisation"]
        lines += [
            "",
            f"Memorisation: self-influence is how much an example's own loss (in {units}) would rise if it",
            f"were removed and the model retrained. {m['n_flagged']} examples lie beyond the tail of its bulk "
            f"(above {m['threshold']:.3g} {units}; false-positive rate {m['false_positive_rate']:g}, about "
            f"{m['expected_false_positives']:.1f} expected by chance)"
            + (
                ""
                if m["n_prediction_flips"] is None
                else f"; {m['n_prediction_flips']} would flip their own prediction if removed"
            )
            + ".",
        ]
        columns = [
            ("index", "train index", ""),
            ("label", "label", ""),
            ("self_influence", "self-influence", ".3g"),
        ]
        if m["flagged"] and "prediction_flip" in m["flagged"][0]:
            columns.append(("prediction_flip", "flips", ""))
        lines += format_rows(m["flagged"][:5], columns, "  ")
        c = m["confirmation"]
        if c is not None:
            lines.append(
                f"  Retrained without {c['n_checked']} of them: {c['n_confirmed']} confirmed (own loss rose by >= "
                f"{CONFIRM_SHARE:g} x the estimate; median actual/estimated {c['median_actual_over_estimated']:.3g})."
                if c["status"] == "verified"
                else f"  Not confirmed by retraining: {c['reason']}"
            )
    return "\n".join(lines)
