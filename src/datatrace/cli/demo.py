"""``datatrace demo``: influence functions on handwritten digits, checked against actual retraining.

1. Data and model: :func:`datatrace.datasets.flipped_digits` (1,000 training and 300 test images, ``flip_fraction``
   of the training labels flipped on purpose) and multinomial logistic regression or, with ``model="mlp"``, a
   64-32-10 tanh network, trained to a tight minimum (:func:`datatrace.datasets.train_to_tolerance`).
2. Influence: the exact Hessian (``damping="auto"``) through the commands' one fitting path
   (:meth:`datatrace.cli.context.Run.fit_influence`); ``score[q, i]`` follows :data:`datatrace.scores.MEANING`
   for every test image ``q`` and training image ``i``, in nats. Self-influence ``(1/n) g_i^T H^{-1} g_i`` is the
   estimated rise of image ``i``'s own loss if it were removed.
3. Its own check: ``n_loo`` random training images are each left out and the model retrained (warm-started;
   :func:`datatrace.verification.retrain.leave_one_out`, cached under ``out_dir/loo-cache``), and the estimated
   and actual changes of the test losses are correlated (:func:`datatrace.verification.metrics.loo_correlation`;
   Koh & Liang 2017, figure 2).
4. Uses: the proponents and opponents of the most confidently misclassified test image, and the flipped labels
   found by ranking training images by self-influence against the training loss and a random order.
5. Output, as every command (:meth:`datatrace.cli.context.Run.finish`): ``report.html`` and ``results.json``, plus
   ``scores.safetensors`` (:meth:`datatrace.Scores.save`) and ``loo.npz`` (estimated and actual leave-one-out
   matrices), and a printed summary (:mod:`datatrace.cli.demo_report`).

Example:
    >>> from datatrace.cli.demo import run_demo
    >>> results = run_demo("datatrace-out", n_loo=8, progress=False)  # doctest: +SKIP
    >>> results["loo"]["mean_pearson"] > 0.9  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from datatrace import __version__
from datatrace.cli.context import Run, check_out_dir, check_seed, using_torch_threads
from datatrace.cli.demo_report import build_report, format_summary
from datatrace.datasets import (
    MODEL_NAMES,
    MODELS,
    SCHEDULES,
    DigitsData,
    QueryLosses,
    WarmStartTrainer,
    build_model,
    flipped_digits,
    train_to_tolerance,
)
from datatrace.errors import UsageError, check_positive_int
from datatrace.fileio import atomic_write
from datatrace.scores import MEANING
from datatrace.tasks import ClassificationTask
from datatrace.verification.metrics import detection_curve, loo_correlation
from datatrace.verification.retrain import leave_one_out

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run", "run_demo"]

logger = logging.getLogger(__name__)

HELP = "influence functions on handwritten digits, checked against actual retraining"
DESCRIPTION = (
    "Train a model on sklearn's digits with 5% of the training labels flipped, estimate for every test image how "
    "its loss (in nats) would change if each training image were removed (positive: the training image helped "
    "it; negative: it hurt it), check the estimates against actual leave-one-out retraining, explain a "
    "misclassified test image by its proponents and opponents, and find the flipped labels by self-influence. "
    "Writes a self-contained report.html, results.json and scores.safetensors to --out."
)
DEFAULT_N_LOO = {"logreg": 40, "mlp": 20}
WEIGHT_DECAY = 1e-3
N_TRAIN = 1000
#: retraining runs in one process by default: the retrains are small, and worker processes on shared cores pay
#: more for starting and competing than they gain
DEFAULT_N_JOBS = 1
UNITS = "nats"
CACHE_VERSION = 1


def run_demo(
    out_dir: str | os.PathLike[str] = "datatrace-out",
    model: str = "logreg",
    n_loo: int | None = None,
    flip_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    n_jobs: int = DEFAULT_N_JOBS,
    stream: TextIO | None = None,
    torch_threads: int | None = 1,
) -> dict[str, Any]:
    """Run the digits demo (see the module docstring) and return every number it computed.

    Args:
        out_dir: directory for ``report.html``, ``results.json``, ``scores.safetensors``, ``loo.npz`` and the
            retraining cache (``loo-cache/``); created if missing.
        model: ``"logreg"`` (multinomial logistic regression, convex) or ``"mlp"`` (a 64-32-10 tanh network).
        n_loo: training images to verify by leave-one-out retraining (default 40 for logreg, 20 for mlp).
        flip_fraction: share of training labels flipped to another class, in (0, 0.5].
        seed: seeds the split, the flips, the initial weights and the leave-one-out sample.
        progress: show progress bars.
        n_jobs: parallel worker processes for retraining (joblib; ``-1`` = all cores).
        stream: where to print the summary (default: ``sys.stdout``; pass ``io.StringIO()`` to capture it).
        torch_threads: torch's intra-op threads while the demo runs (restored afterwards); ``None`` leaves the
            setting alone. The models are tiny: several threads on small tensors mostly spin.

    Returns:
        A JSON-ready dict (also written to ``out_dir/results.json``); e.g. ``results["loo"]["mean_pearson"]``.
    """
    if model not in MODELS:
        raise UsageError(
            f"model={model!r} is not allowed: expected one of {list(MODELS)}. Fix: pass 'logreg'."
        )
    try:
        n_loo = check_positive_int("n_loo", DEFAULT_N_LOO[model] if n_loo is None else n_loo, minimum=2)
        n_threads = None if torch_threads is None else check_positive_int("torch_threads", torch_threads)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if n_loo > N_TRAIN:
        raise UsageError(
            f"n_loo={n_loo} is more than the {N_TRAIN} training images. Fix: pass at most {N_TRAIN}."
        )
    try:
        flip_fraction = float(flip_fraction)
    except (TypeError, ValueError):
        raise UsageError(
            f"flip_fraction={flip_fraction!r} is not a number. Fix: pass a fraction such as 0.05."
        ) from None
    if not 0.0 < flip_fraction <= 0.5:
        raise UsageError(
            f"flip_fraction={flip_fraction!r} is not allowed: expected a fraction in (0, 0.5] (the share of "
            "training labels flipped, and there must be some to find). Fix: pass e.g. 0.05."
        )
    seed = check_seed(seed, "seed")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise UsageError(
            f"n_jobs={n_jobs!r} is not allowed: expected -1 or an integer >= 1. Fix: pass 1 or 2."
        )
    run = Run(
        command="demo",
        out=check_out_dir(out_dir),
        progress=progress,
        stream=sys.stdout if stream is None else stream,
        seed=seed,
    )
    with using_torch_threads(n_threads):
        return _run_demo(run, model, n_loo, flip_fraction, n_jobs)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else float("nan")


def _run_demo(run: Run, model: str, n_loo: int, flip_fraction: float, n_jobs: int) -> dict[str, Any]:
    out, seed, timings = run.out, run.seed, run.timings
    data = flipped_digits(seed, flip_fraction, n_train=N_TRAIN)
    train, test = data.train(), data.test()
    n_flipped, n_test = int(data.flipped.sum()), len(data.y_test)
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    schedule = SCHEDULES[model]
    tolerance = schedule.tolerance
    logger.info(
        "training %s on %d digits (%d labels flipped) with L-BFGS", MODEL_NAMES[model], N_TRAIN, n_flipped
    )
    t0 = time.perf_counter()
    trained = train_to_tolerance(
        build_model(model, seed),
        task,
        train,
        tolerance=tolerance,
        max_iter=schedule.fit_iter,
        rounds=schedule.fit_rounds,
    )
    timings["train_seconds"] = time.perf_counter() - t0
    if trained.grad_max > 100 * tolerance:
        logger.warning(
            "the model stopped at max |grad L| = %.3g, above the target %.1g: influence functions assume a "
            "minimum, so expect looser agreement with retraining.",
            trained.grad_max,
            tolerance,
        )
    with torch.no_grad():
        train_logits, test_logits = trained(train[0]), trained(test[0])
        train_loss = task.loss(trained, train).numpy()
        test_loss = task.loss(trained, test).numpy()
    test_pred = test_logits.argmax(1).numpy()

    influence = run.fit_influence(trained, task, train, N_TRAIN, "exact", "auto")
    t0 = time.perf_counter()
    scores = influence.score(test)
    self_influence = influence.self_influence().numpy()
    timings["influence_seconds"] += time.perf_counter() - t0
    values = scores.values.numpy()
    scores.metadata.update({"demo": "digits", "model": model, "seed": seed, "flip_fraction": flip_fraction})
    scores_path = run.defer("scores.safetensors", scores.save)
    run.outputs["scores.safetensors.json"] = lambda path: None  # written by Scores.save beside the values

    config = {
        "model": model,
        "n_loo": n_loo,
        "flip_fraction": flip_fraction,
        "seed": seed,
        "n_jobs": n_jobs,
        "weight_decay": WEIGHT_DECAY,
        "curvature": "exact",
        "damping": "auto",
        "lbfgs_schedule": dataclasses.asdict(schedule),
        "torch_threads": torch.get_num_threads(),
    }
    loo, loo_arrays = _leave_one_out_check(run, config, data, trained, task, values, self_influence)
    detection, curves = _detection(data, self_influence, train_loss)
    results: dict[str, Any] = {
        "datatrace_version": __version__,
        "meaning": MEANING,
        "units": f"{UNITS} (natural-log cross-entropy of a test image)",
        "config": config,
        "data": {
            "source": "sklearn.datasets.load_digits, pixels / 16",
            "n_train": N_TRAIN,
            "n_test": n_test,
            "n_flipped": n_flipped,
            "flipped_train_indices": np.flatnonzero(data.flipped),
        },
        "model": {
            "kind": model,
            "description": MODEL_NAMES[model],
            "num_params": sum(p.numel() for p in trained.parameters()),
            "train_accuracy": float((train_logits.argmax(1).numpy() == data.y_train).mean()),
            "test_accuracy": float((test_pred == data.y_test).mean()),
            "train_loss_mean": float(train_loss.mean()),
            "test_loss_mean": float(test_loss.mean()),
            "gradient_max": float(trained.grad_max),
        },
        "influence": {
            "curvature": run.curvature_info(),
            "gradient_norm": influence.gradient_norm_,
            "self_influence_mean": float(self_influence.mean()),
            "self_influence_max": float(self_influence.max()),
        },
        "loo": loo,
        "explanation": _explain_worst(data, scores, test_pred, test_loss),
        "detection": detection,
        "timings": timings,
        "files": {
            "report": str(out / "report.html"),
            "results": str(out / "results.json"),
            "scores": str(scores_path),
            "loo": str(out / "loo.npz"),
        },
    }
    t0 = time.perf_counter()
    report = build_report(run, results, data, *loo_arrays, *curves, self_influence)
    timings["report_seconds"] = time.perf_counter() - t0
    return run.finish(
        results, report, format_summary(results), time_parts=("train", "influence", "retrain", "report")
    )


def _leave_one_out_check(
    run: Run,
    config: dict[str, Any],
    data: DigitsData,
    trained: nn.Module,
    task: ClassificationTask,
    values: np.ndarray,
    self_influence: np.ndarray,
) -> tuple[dict[str, Any], tuple[np.ndarray, ...]]:
    """Retrain without each of ``n_loo`` random training images; correlate estimated and actual changes.

    Returns the results' ``loo`` section and the arrays its plots show: estimated and actual changes of the test
    losses, estimated and actual rise of each left-out image's own loss."""
    model, seed, n_loo, n_jobs = config["model"], run.seed, config["n_loo"], config["n_jobs"]
    schedule = SCHEDULES[model]
    train, test = data.train(), data.test()
    n_test = len(data.y_test)
    rng = np.random.default_rng([seed, 2])
    loo_idx = np.sort(rng.choice(N_TRAIN, size=n_loo, replace=False)).astype(np.int64)
    evaluate = QueryLosses(
        task, torch.cat([test[0], train[0][loo_idx]]), torch.cat([test[1], train[1][loo_idx]])
    )
    cache_config = {
        "version": CACHE_VERSION,
        "model": model,
        "seed": seed,
        "flip_fraction": config["flip_fraction"],
        "n_loo": n_loo,
        "weight_decay": WEIGHT_DECAY,
        "schedule": dataclasses.asdict(schedule),
        "torch": torch.__version__,
    }
    key = hashlib.sha256(json.dumps(cache_config, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = run.out / "loo-cache" / f"{model}-{key}"
    logger.info(
        "retraining %d times, each without one training image (n_jobs=%d, cache %s)", n_loo, n_jobs, cache_dir
    )
    t0 = time.perf_counter()
    result = leave_one_out(
        WarmStartTrainer(trained, task, schedule),
        train,
        evaluate,
        indices=loo_idx,
        n_jobs=n_jobs,
        cache_dir=cache_dir,
        progress=run.progress,
        base_outputs=evaluate(trained),
    )
    run.timings["retrain_seconds"] = time.perf_counter() - t0
    actual = result.changes[:n_test]  # (n_test, n_loo)
    estimated = values[:, loo_idx]
    retrain_grad = result.retrained[-1]
    correlation = loo_correlation(estimated, actual)
    actual_self = np.array([result.changes[n_test + j, j] for j in range(n_loo)])
    estimated_self = self_influence[loo_idx]
    n_unconverged = int((retrain_grad > 100 * schedule.tolerance).sum())
    # per left-out example: do its estimated effects on the test losses line up with the actual ones, and are
    # they the right size? (a column view of the same matrices; it shows which retrains disagree)
    per_retrain = {
        "train_index": loo_idx,
        "pearson": np.array([_pearson(estimated[:, j], actual[:, j]) for j in range(n_loo)]),
        "size_ratio": np.abs(estimated).mean(axis=0) / np.maximum(np.abs(actual).mean(axis=0), 1e-300),
        "flipped": data.flipped[loo_idx],
    }
    if n_unconverged:
        logger.warning(
            "%d of %d retrains stopped above max |grad L| = %.1g (largest %.3g): the 'actual' changes carry that "
            "optimisation error.",
            n_unconverged,
            n_loo,
            100 * schedule.tolerance,
            float(retrain_grad.max()),
        )

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle,
                indices=loo_idx,
                estimated=estimated,
                actual=actual,
                estimated_self=estimated_self,
                actual_self=actual_self,
            )

    run.defer("loo.npz", lambda path: atomic_write(path, write_npz))
    loo = {
        "indices": loo_idx,
        "n_query": n_test,
        "mean_pearson": float(correlation.mean_pearson),
        "mean_spearman": float(correlation.mean_spearman),
        "pooled_pearson": float(correlation.pooled_pearson),
        "per_query_pearson": correlation.pearson,
        "self_influence_pearson": _pearson(estimated_self, actual_self),
        "retrain_gradient_max": float(retrain_grad.max()),
        "n_retrains_above_tolerance": n_unconverged,
        "actual_change_abs_mean": float(np.abs(actual).mean()),
        "per_retrain": per_retrain,
        "per_retrain_median_pearson": float(np.nanmedian(per_retrain["pearson"])),
        "per_retrain_median_size_ratio": float(np.nanmedian(per_retrain["size_ratio"])),
        "cache_dir": str(cache_dir),
    }
    return loo, (estimated, actual, estimated_self, actual_self)


def _explain_worst(
    data: DigitsData, scores: Any, test_pred: np.ndarray, test_loss: np.ndarray
) -> dict[str, Any]:
    """The top 5 proponents and opponents of the misclassified test image with the highest loss."""
    wrong = np.flatnonzero(test_pred != data.y_test)
    pool = wrong if wrong.size else np.arange(len(data.y_test))
    q = int(pool[np.argmax(test_loss[pool])])
    pro, opp = scores.proponents(q, 5), scores.opponents(q, 5)

    def describe_train(indices: torch.Tensor, vals: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {
                "train_index": int(i),
                "label": int(data.y_train[i]),
                "true_label": int(data.y_train_true[i]),
                "flipped": bool(data.flipped[i]),
                "score": float(v),
            }
            for i, v in zip(indices.tolist(), vals.tolist())
        ]

    return {
        "query_test_index": q,
        "query_digits_row": int(data.test_rows[q]),
        "true_label": int(data.y_test[q]),
        "predicted_label": int(test_pred[q]),
        "misclassified": bool(test_pred[q] != data.y_test[q]),
        "loss": float(test_loss[q]),
        "chosen_as": "the misclassified test image with the highest loss"
        if wrong.size
        else "the test image with the highest loss (none is misclassified)",
        "proponents": describe_train(pro.indices, pro.values),
        "opponents": describe_train(opp.indices, opp.values),
    }


def _detection(
    data: DigitsData, self_influence: np.ndarray, train_loss: np.ndarray
) -> tuple[dict[str, Any], tuple[Any, Any]]:
    """Flipped labels found by self-influence, by training loss and at random; and the two detection curves."""
    n_flipped = int(data.flipped.sum())
    curve_self = detection_curve(self_influence, data.flipped)
    curve_loss = detection_curve(train_loss, data.flipped)
    detection: dict[str, Any] = {"n_flipped": n_flipped, "n_train": N_TRAIN, "auc": {}, "top": []}
    detection["auc"] = {
        "self_influence": float(curve_self.auc),
        "training_loss": float(curve_loss.auc),
        "random": 0.5,
    }
    for fraction in (0.05, 0.10):
        detection["top"].append(
            {
                "fraction_inspected": fraction,
                "n_inspected": round(float(curve_self.random_found_at(fraction)) * N_TRAIN),
                "found_by_self_influence": round(float(curve_self.found_at(fraction)) * n_flipped),
                "found_by_training_loss": round(float(curve_loss.found_at(fraction)) * n_flipped),
                "expected_by_random": float(curve_self.random_found_at(fraction)) * n_flipped,
            }
        )
    return detection, (curve_self, curve_loss)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``datatrace demo``."""
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="logreg",
        help="logreg: multinomial logistic regression (convex, default); mlp: a 64-32-10 tanh network.",
    )
    parser.add_argument(
        "--out",
        default="datatrace-out",
        metavar="DIR",
        help="directory for report.html, results.json, scores.safetensors and the retraining cache "
        "(created if missing; default: ./datatrace-out).",
    )
    parser.add_argument(
        "--n-loo",
        type=int,
        default=None,
        metavar="N",
        help="training images to check by actual leave-one-out retraining "
        f"(default: {DEFAULT_N_LOO['logreg']} for logreg, {DEFAULT_N_LOO['mlp']} for mlp).",
    )
    parser.add_argument(
        "--flip-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="share of training labels flipped to another class on purpose, in (0, 0.5] (default: 0.05).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed for the split, flips, weights and LOO sample."
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_N_JOBS,
        metavar="N",
        help=f"parallel processes for retraining (-1: all cores; default: {DEFAULT_N_JOBS}).",
    )


def run(args: argparse.Namespace) -> int:
    """``datatrace demo``: run :func:`run_demo` with the parsed flags."""
    run_demo(
        args.out,
        model=args.model,
        n_loo=args.n_loo,
        flip_fraction=args.flip_fraction,
        seed=args.seed,
        progress=not args.quiet,
        n_jobs=args.jobs,
        stream=sys.stdout,
    )
    return 0
