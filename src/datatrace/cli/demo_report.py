"""What ``datatrace demo`` shows: its printed summary and its HTML report, from the numbers of its run.

Kept apart from the computation (:mod:`datatrace.cli.demo`) so that the demo reads as the steps it takes. Every
score follows :data:`datatrace.scores.MEANING`, in nats (the cross-entropy uses the natural log); the words here
say it for test images and self-influence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datatrace.cli.context import Run
from datatrace.cli.render import add_timings
from datatrace.cli.report import Report, plot_detection_curve, plot_estimated_vs_actual, plot_image_grid
from datatrace.datasets import DIGITS_IMAGE_SHAPE, DigitsData

__all__ = ["build_report", "format_summary"]


#: what the per-retrain size ratio means and what a good value is (the demo's summary and report)
SIZE_RATIO_MEANING = (
    "1 means the scores have the right size in nats; 0.87 would mean they are 13% too small, 1.15 15% too "
    "large. Between 0.8 and 1.25 the scores can be read in their units; far from 1, trust only their order."
)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def format_summary(results: dict[str, Any]) -> str:
    """The printed summary of :func:`datatrace.cli.demo.run_demo` (plain text, the convention in words);
    :meth:`datatrace.cli.context.Run.finish` adds the files and timings."""
    r = results
    m, loo, ex, det = r["model"], r["loo"], r["explanation"], r["detection"]
    info = r["influence"]["curvature"]
    lines = [
        f"datatrace demo: digits, {m['description']}, {m['num_params']} parameters (float64, weight decay "
        f"{r['config']['weight_decay']:g})",
        f"  data: {r['data']['n_train']} training images ({r['data']['n_flipped']} labels flipped on purpose), "
        f"{r['data']['n_test']} test images; test accuracy {_pct(m['test_accuracy'])}, "
        f"max |grad L| = {m['gradient_max']:.1g}",
        f"  curvature: exact Hessian, eigenvalues in [{info['eigenvalue_min']:.3g}, {info['eigenvalue_max']:.3g}], "
        f"{info['num_negative']} negative, damping {info['damping']:.3g} (auto)",
        "",
        "What a score means: score[q, i] estimates how much test image q's loss (cross-entropy, in nats) changes",
        "if training image i is removed and the model retrained. Positive: i helped q (a proponent).",
        "Negative: i hurt q (an opponent). Self-influence estimates how much i's own loss would rise if removed.",
        "",
        f"Check against actual retraining ({len(loo['indices'])} training images left out one at a time, "
        f"{loo['n_query']} test losses each):",
        f"  mean Pearson correlation {loo['mean_pearson']:.3f}, mean Spearman {loo['mean_spearman']:.3f} "
        f"(per test image, across the {len(loo['indices'])} retrains); pooled Pearson {loo['pooled_pearson']:.3f}",
        f"  self-influence vs actual rise of the left-out image's own loss: Pearson {loo['self_influence_pearson']:.3f}",
        f"  typical actual change |f(theta without i) - f(theta)|: {loo['actual_change_abs_mean']:.2g} nats; "
        f"retrains converged to max |grad L| <= {loo['retrain_gradient_max']:.1g}",
        f"  per left-out image, across the {loo['n_query']} test losses: median Pearson "
        f"{loo['per_retrain_median_pearson']:.3f}, median size estimated/actual "
        f"{loo['per_retrain_median_size_ratio']:.2f}",
        "    (size estimated/actual: for one left-out image, the mean |estimated change| of the test losses divided",
        f"    by the mean |actual change|. {SIZE_RATIO_MEANING})",
    ]
    if loo["mean_pearson"] < 0.9:
        lines.append(
            "  Looser agreement is expected on a network: influence functions are a first-order estimate around "
            "the\n  trained weights, and some retrains move further than that (results.json: loo.per_retrain)."
        )
    lines += [
        "",
        f"Why is test image {ex['query_test_index']} (true label {ex['true_label']}) "
        + (f"predicted as {ex['predicted_label']}" if ex["misclassified"] else "hard")
        + f"? Its loss is {ex['loss']:.3g} nats ({ex['chosen_as']}).",
    ]

    def table(title: str, rows: list[dict[str, Any]]) -> None:
        lines.append(title)
        if not rows:
            lines.append("    (none)")
            return
        lines.append(
            f"    {'train index':>11}  {'label':>5}  {'true':>4}  {'flipped':>7}  {'score (nats)':>12}"
        )
        for row in rows:
            lines.append(
                f"    {row['train_index']:>11}  {row['label']:>5}  {row['true_label']:>4}  "
                f"{'yes' if row['flipped'] else 'no':>7}  {row['score']:>+12.4g}"
            )

    table(
        "  proponents (removing one would RAISE this loss by the score: they pulled toward the true label)",
        ex["proponents"],
    )
    table(
        "  opponents (removing one would LOWER this loss by |score|: they pushed toward the wrong answer)",
        ex["opponents"],
    )
    lines += [
        "",
        f"Finding the {det['n_flipped']} flipped labels by ranking training images by self-influence:",
    ]
    for top in det["top"]:
        lines.append(
            f"  top {_pct(top['fraction_inspected'])} ({top['n_inspected']} images): "
            f"{top['found_by_self_influence']} of {det['n_flipped']} found by self-influence, "
            f"{top['found_by_training_loss']} by training loss, {top['expected_by_random']:.1f} expected at random"
        )
    lines.append(
        f"  area under the detection curve: self-influence {det['auc']['self_influence']:.3f}, "
        f"training loss {det['auc']['training_loss']:.3f}, random 0.5"
    )
    return "\n".join(lines)


def _grid_caption(row: dict[str, Any]) -> str:
    label = f"#{row['train_index']} label {row['label']}"
    if row["flipped"]:
        label += f" (was {row['true_label']})"
    return f"{label}\n{row['score']:+.3g} nats"


def build_report(
    run: Run,
    results: dict[str, Any],
    data: DigitsData,
    estimated: np.ndarray,
    actual: np.ndarray,
    estimated_self: np.ndarray,
    actual_self: np.ndarray,
    curve_self: Any,
    curve_loss: Any,
    self_influence: np.ndarray,
) -> Report:
    """The demo's HTML report: set-up, the check against retraining, a misclassified test image explained, and
    the flipped labels found (:meth:`datatrace.cli.context.Run.finish` saves it)."""
    r = results
    m, loo, ex, det = r["model"], r["loo"], r["explanation"], r["detection"]
    report = Report(
        f"datatrace demo: digits, {m['description']}",
        f"{r['data']['n_train']} training images ({r['data']['n_flipped']} labels flipped on purpose), "
        f"{r['data']['n_test']} test images, seed {r['config']['seed']}.",
    )
    report.add_heading("What the numbers mean")
    report.add_paragraph(
        "score[q, i] estimates f_q(theta without i) - f_q(theta_hat): how much test image q's loss (cross-entropy, "
        "in nats) would change if training image i were removed and the model retrained. Positive: removing i "
        "raises q's loss, so i helped q (a proponent). Negative: i hurt q (an opponent). Self-influence "
        "(1/n) g_i^T H^-1 g_i estimates how much training image i's own loss would rise if it were removed "
        "(large for atypical or mislabelled images)."
    )
    report.add_key_values(
        {
            "model": f"{m['description']}, {m['num_params']} parameters, float64",
            "weight decay": r["config"]["weight_decay"],
            "training accuracy (on the labels trained on)": m["train_accuracy"],
            "test accuracy": m["test_accuracy"],
            "max |grad L| at the trained model": m["gradient_max"],
            "curvature": "exact Hessian, damping=auto",
            "Hessian eigenvalues (min, max)": f"{r['influence']['curvature']['eigenvalue_min']:.4g}, "
            f"{r['influence']['curvature']['eigenvalue_max']:.4g}",
            "negative eigenvalues": r["influence"]["curvature"]["num_negative"],
            "damping used": r["influence"]["curvature"]["damping"],
        },
        caption="Set-up",
    )

    report.add_heading("Check against actual retraining")
    report.add_paragraph(
        f"{len(loo['indices'])} randomly chosen training images were each left out and the model retrained "
        f"(L-BFGS warm-started from the trained weights, to max |grad L| <= {loo['retrain_gradient_max']:.1g}). "
        f"For each of the {loo['n_query']} test images, the estimated and the actual changes of its loss are "
        "correlated across the left-out images."
    )
    report.add_key_values(
        {
            "mean Pearson correlation (per test image)": loo["mean_pearson"],
            "mean Spearman correlation (per test image)": loo["mean_spearman"],
            "pooled Pearson correlation (all pairs)": loo["pooled_pearson"],
            "self-influence vs actual rise of own loss (Pearson)": loo["self_influence_pearson"],
            "mean |actual change| (nats)": loo["actual_change_abs_mean"],
            "median per left-out image: Pearson across test images": loo["per_retrain_median_pearson"],
            "median per left-out image: size estimated / actual": loo["per_retrain_median_size_ratio"],
        },
        caption="Estimated vs actual leave-one-out changes",
    )
    report.add_figure(
        plot_estimated_vs_actual(
            estimated,
            actual,
            title="Change of test losses when one training image is removed",
            xlabel="actual change (retrained), nats",
            ylabel="estimated change (influence function), nats",
        ),
        "One point per (test image, left-out training image) pair. Points on the red line are estimated exactly; "
        "the title's correlations pool all pairs, the table above averages per test image. Size estimated / actual "
        "(per left-out image): the mean |estimated change| of the test losses divided by the mean |actual change|. "
        + SIZE_RATIO_MEANING,
    )
    report.add_figure(
        plot_estimated_vs_actual(
            estimated_self,
            actual_self,
            title="Self-influence: rise of the left-out image's own loss",
            xlabel="actual rise (retrained), nats",
            ylabel="self-influence (estimated), nats",
        ),
        "One point per left-out training image.",
    )
    per = loo["per_retrain"]
    report.add_table(
        [
            [int(i), bool(f), p, ratio, e_self, a_self]
            for i, f, p, ratio, e_self, a_self in zip(
                per["train_index"],
                per["flipped"],
                per["pearson"],
                per["size_ratio"],
                estimated_self,
                actual_self,
            )
        ],
        [
            "left-out train index",
            "label flipped",
            "Pearson across test losses",
            "size estimated / actual",
            "self-influence (nats)",
            "actual rise of own loss (nats)",
        ],
        caption="Each retrain: how well its estimated effects on the test losses match the actual ones",
    )

    report.add_heading(
        "Explaining a misclassified test image" if ex["misclassified"] else "Explaining a test image"
    )
    report.add_paragraph(
        f"Test image {ex['query_test_index']} (true label {ex['true_label']})"
        + (f" is predicted as {ex['predicted_label']}" if ex["misclassified"] else "")
        + f", with loss {ex['loss']:.4g} nats; it is {ex['chosen_as']}. Proponents: removing one would raise its "
        "loss by the score shown (they pulled it toward its true label). Opponents: removing one would lower its "
        "loss by the score's size (they pushed it toward the wrong answer). Red outline: a label flipped on purpose."
    )
    report.add_figure(
        plot_image_grid(
            data.X_test[[ex["query_test_index"]]],
            [f"test #{ex['query_test_index']}: true {ex['true_label']}, predicted {ex['predicted_label']}"],
            image_shape=DIGITS_IMAGE_SHAPE,
            cell_size=2.4,
        ),
        "The test image being explained.",
    )
    for name, rows in (("proponents", ex["proponents"]), ("opponents", ex["opponents"])):
        if not rows:
            report.add_paragraph(
                f"No training image has a {'positive' if name == 'proponents' else 'negative'} score."
            )
            continue
        idx = [row["train_index"] for row in rows]
        report.add_figure(
            plot_image_grid(
                data.X_train[idx],
                [_grid_caption(row) for row in rows],
                image_shape=DIGITS_IMAGE_SHAPE,
                title=f"Top {len(rows)} {name} (score = change of the test image's loss if removed)",
                highlight=[row["flipped"] for row in rows],
                highlight_label="label flipped on purpose",
            ),
            f"Top {name} of test image {ex['query_test_index']}, with the label each was trained on.",
        )
        report.add_table(
            [
                [row["train_index"], row["label"], row["true_label"], row["flipped"], row["score"]]
                for row in rows
            ],
            ["train index", "label trained on", "true label", "flipped", "score (nats)"],
            caption=f"Top {name}",
        )

    report.add_heading("Finding the flipped labels")
    report.add_paragraph(
        f"{det['n_flipped']} of {det['n_train']} training labels were flipped. Training images are ranked by "
        "self-influence (highest first) and inspected in that order; the curve shows the share of flipped labels "
        "found. Ranking by training loss and a random order are shown for comparison."
    )
    report.add_table(
        [
            [
                f"top {_pct(t['fraction_inspected'])} ({t['n_inspected']} images)",
                t["found_by_self_influence"],
                t["found_by_training_loss"],
                t["expected_by_random"],
            ]
            for t in det["top"]
        ]
        + [["area under the curve", det["auc"]["self_influence"], det["auc"]["training_loss"], 0.5]],
        ["inspected", "found by self-influence", "found by training loss", "expected at random"],
        caption=f"Flipped labels found (of {det['n_flipped']})",
    )
    report.add_figure(
        plot_detection_curve(
            {"self-influence": curve_self, "training loss": curve_loss},
            title="Finding flipped labels",
            flagged_fraction=det["n_flipped"] / det["n_train"],
            ylabel="fraction of flipped labels found",
        ),
        "Dotted verticals at 5% and 10% inspected.",
    )
    top = np.argsort(-self_influence, kind="stable")[:10]
    report.add_figure(
        plot_image_grid(
            data.X_train[top],
            [
                f"#{i} label {data.y_train[i]}"
                + (f" (was {data.y_train_true[i]})" if data.flipped[i] else "")
                + f"\n{self_influence[i]:.3g} nats"
                for i in top
            ],
            image_shape=DIGITS_IMAGE_SHAPE,
            title="Highest self-influence",
            highlight=data.flipped[top].tolist(),
            highlight_label="label flipped on purpose",
        ),
        "The 10 training images whose own loss would rise most if removed.",
    )
    return add_timings(report, run)
