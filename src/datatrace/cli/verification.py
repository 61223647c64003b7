"""``--verify N``: every command's answer carries its accuracy, measured by retraining with the spec's ``train_fn``.

:func:`verify_scores` runs :func:`datatrace.verification.verify` on the scores a command computed (its queries'
rows of the score matrix) with ``n_retrains=N`` and ``cache_dir=<out>/verify-cache/<run key>``, so every retrain is
kept as soon as it finishes: Ctrl-C stops the verification, the report and ``results.json`` still come out (with
the estimates, saying how many retrains were finished and that nothing was compared), and rerunning the same
command resumes where it stopped. Before retraining it times one training run on the full data and prints the
predicted cost; ``verify`` shows a progress bar.

:func:`add_verification` writes the report section: the estimated-vs-actual scatter, the agreement numbers, the
verdict with its explanation, why the method (leave-one-out or random subsets) was chosen, and what to try when the
verdict is poor; or, without a ``train_fn``, that nothing was verified and why.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from datatrace.attributors.sklearn import SklearnInfluence
from datatrace.cli.report import Report, plot_estimated_vs_actual
from datatrace.cli.spec_model import take
from datatrace.errors import SpecError, UsageError
from datatrace.fileio import sha256_file
from datatrace.verification.verify import verify

__all__ = [
    "CACHE",
    "ModuleTrainFn",
    "add_verification",
    "add_verify_argument",
    "cache_dir",
    "check_verify",
    "n_cached",
    "split_scores",
    "summary_lines",
    "time_one_training",
    "verify_scores",
]

logger = logging.getLogger("datatrace.cli.verification")

#: the folder under ``--out`` that keeps finished retrains (carried over by every run, never swapped away)
CACHE = "verify-cache"
#: at most this many examples of validation() / query() are measured (a seeded sample): agreement is averaged
#: over queries, and a sample of them measures it as well as all of them
MAX_QUERIES = 100


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--verify N`` flag."""
    parser.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="N",
        help="retrain the model about N times with the spec's train_fn(subset) and measure how well the scores "
        "agree with actual retraining (leave-one-out or random half subsets); the report gives the verdict. "
        "Finished retrains are kept in --out/verify-cache: Ctrl-C and rerun to resume (default: 0, no check).",
    )


def check_verify(n: Any) -> int:
    """``n`` if it is 0 or an integer >= 4 (verify's smallest budget), else a :class:`UsageError`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not (n == 0 or n >= 4):
        raise UsageError(
            f"--verify {n!r} is not allowed: expected 0 (no check) or an integer >= 4 (retraining runs). Fix: pass "
            "e.g. --verify 40."
        )
    return int(n)


class ModuleTrainFn:
    """The spec's ``train_fn`` returning an ``nn.Module``: a fitted estimator becomes its exact PyTorch equivalent
    (:func:`datatrace.from_sklearn`), so the task's measurement can evaluate it. Picklable; passes ``seed`` on
    when the spec's ``train_fn`` takes one."""

    def __init__(self, train_fn: Callable[..., Any]) -> None:
        self.train_fn = train_fn
        try:
            self.accepts_seed = "seed" in inspect.signature(train_fn).parameters
        except (TypeError, ValueError):
            self.accepts_seed = False

    def __call__(self, subset: Any, seed: int | None = None) -> nn.Module:
        model = (
            self.train_fn(subset, seed=seed)
            if self.accepts_seed and seed is not None
            else self.train_fn(subset)
        )
        return model if isinstance(model, nn.Module) else SklearnInfluence(model).module_


def cache_dir(ctx: Any, n_retrains: int, what: str, **key: Any) -> Path:
    """``<out>/verify-cache/<command>-<key>``: one folder per request (spec file, seed, budget, queries), so a rerun
    of the same command resumes and another request never meets a cache made for a different one."""
    spec_sha = sha256_file(ctx.spec.path) if Path(ctx.spec.path).is_file() else str(ctx.spec.path)
    request = {"spec": spec_sha, "seed": ctx.seed, "n": n_retrains, "what": what, **key}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return ctx.out / CACHE / f"{ctx.command}-{digest}"


def n_cached(path: Path) -> int:
    """How many finished retrains a cache folder holds (one ``.npy`` file each, in any subfolder)."""
    return sum(1 for _ in path.rglob("*.npy")) if path.is_dir() else 0


def time_one_training(ctx: Any, train_fn: Callable[..., Any], n_models: int, cache: Path) -> dict[str, Any]:
    """Time one ``train_fn`` run and print the predicted cost of ``n_models`` runs (minus those already in
    ``cache``); returns the numbers for results.json.

    The timed run trains on all the training data but the last example, as a retrain does: a ``train_fn`` that
    warm-starts from the trained model (the credit example's) returns at once on the data it was trained on, and
    would predict far too little.
    """
    source = ctx.spec.source("train")
    n = len(source)
    t0 = time.perf_counter()
    train_fn(source.subset(list(range(n - 1))))
    one = time.perf_counter() - t0
    cached = n_cached(cache)
    remaining = max(0, n_models - cached)
    line = (
        f"Verifying by retraining: one training run on {n - 1} of the {n} examples took {one:.2g} s; about "
        f"{remaining} more run(s) to go ({cached} already in {cache}), about {remaining * one:.3g} s in one job. "
        "Ctrl-C keeps the finished runs; rerun the same command to resume."
    )
    logger.info("%s", line)
    ctx.stream.write(line + "\n")
    ctx.stream.flush()
    return {
        "one_training_seconds": one,
        "predicted_models": remaining,
        "predicted_seconds": remaining * one,
        "cached_before": cached,
    }


def _not_verified(reason: str) -> dict[str, Any]:
    return {"status": "not verified", "verdict": None, "reason": reason}


def split_scores(ctx: Any, split: str, n_retrains: int) -> tuple[Any, np.ndarray | None, list[int]]:
    """``(query data, scores, indices)`` of up to :data:`MAX_QUERIES` examples of ``split`` (a sample seeded by
    ``--seed``) for :func:`verify_scores`; ``(None, None, [])`` without ``--verify``, a ``train_fn`` or the split."""
    spec = ctx.spec
    if not n_retrains or spec.train_fn is None or not spec.has(split):
        return None, None, []
    n = spec.n(split)
    rng = np.random.default_rng([ctx.seed, 13])
    indices = (
        sorted(rng.choice(n, MAX_QUERIES, replace=False).tolist()) if n > MAX_QUERIES else list(range(n))
    )
    data = take(spec.influence_data(split), indices)
    values = ctx.influence.score(data).values
    values = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    return data, values, indices


def verify_scores(
    ctx: Any, n_retrains: int, query: Any, scores: Any, *, what: str, **key: Any
) -> tuple[dict[str, Any] | None, tuple[np.ndarray, np.ndarray] | None]:
    """Verify ``scores`` (``(n_query, n_train)``, the rows of ``query``) by retraining; returns the results.json
    section and the estimated / actual arrays of its scatter (None when nothing was compared).

    ``what`` says in words what the scores are (e.g. ``"the 3 explained queries' loss"``); ``key`` enters the
    cache folder's name (e.g. the query indices). ``n_retrains=0`` returns ``(None, None)``.
    """
    if not n_retrains:
        return None, None
    spec = ctx.spec
    if spec.train_fn is None:
        return (
            _not_verified(
                f"the spec {spec.path.name} defines no train_fn(subset), so the model cannot be retrained and the "
                "scores were not checked. Fix: add train_fn(subset) returning the model trained on subset, the way "
                "model() was trained."
            ),
            None,
        )
    if query is None:
        return _not_verified(f"nothing to measure: {what}"), None
    train_fn = ModuleTrainFn(spec.retrain_fn())
    cache = cache_dir(ctx, n_retrains, what, **key)
    section: dict[str, Any] = {"what": what, "n_retrains_requested": n_retrains, "cache_dir": str(cache)}
    t0 = time.perf_counter()
    try:
        section.update(time_one_training(ctx, train_fn, n_retrains + 3, cache))
        result = verify(
            ctx.influence,
            spec.encoded("train"),
            train_fn,
            query,
            scores=scores,
            n_retrains=n_retrains,
            random_state=ctx.seed,
            cache_dir=cache,
            progress=ctx.progress,
        )
    except KeyboardInterrupt:
        finished = n_cached(cache)
        logger.warning("verification interrupted: %d finished retrain(s) kept in %s", finished, cache)
        section.update(
            status="interrupted",
            verdict=None,
            n_retrains_finished=finished,
            seconds=time.perf_counter() - t0,
            reason=(
                f"interrupted (Ctrl-C) after {finished} finished retraining run(s), all kept in {cache}; nothing "
                "was compared yet. Rerun the same command to resume from there."
            ),
        )
        ctx.timings["verify_seconds"] = section["seconds"]
        return section, None
    except (SpecError, UsageError):
        raise
    except Exception as err:
        raise RuntimeError(
            f"spec {spec.path}: --verify failed while retraining with train_fn(subset): {type(err).__name__}: "
            f"{err}. Fix: check that train_fn accepts a subset in the form train() returns and returns the trained "
            "model, or drop --verify."
        ) from err
    section.update(status="verified", **result.to_dict(), seconds=time.perf_counter() - t0)
    ctx.timings["verify_seconds"] = section["seconds"]
    return section, (np.asarray(result.estimated), np.asarray(result.actual))


def add_verification(
    report: Report,
    section: dict[str, Any] | None,
    arrays: tuple[np.ndarray, np.ndarray] | None,
    units: str,
) -> None:
    """The report's "How accurate is this?" section (nothing when ``--verify`` was not asked for)."""
    if section is None:
        return
    report.add_heading("How accurate is this? Checked by retraining")
    if section["status"] != "verified":
        report.add_paragraph(f"Not verified: {section['reason']}")
        return
    loo = section["method"] == "leave-one-out"
    report.add_paragraph(
        f"Verdict: {section['verdict'].upper()}. {section['explanation']}\n\n"
        f"What was checked: {section['what']}, with {section['n_retrains']} models trained by the spec's train_fn "
        f"({section['seconds']:.1f} s; one training run took {section['one_training_seconds']:.2g} s). Method: "
        f"{section['method']}, because {section['reason']}."
    )
    report.add_key_values(
        {k.replace("_", " "): v for k, v in section["agreement"].items()},
        caption="Agreement with actual retraining",
    )
    if arrays is not None and np.asarray(arrays[0]).size >= 2:
        estimated, actual = arrays
        if loo:
            figure = plot_estimated_vs_actual(
                estimated,
                actual,
                title="Estimated vs actual leave-one-out change",
                xlabel=f"actual change of the query's loss when the example is removed ({units})",
                ylabel=f"estimated change (score, {units})",
            )
            caption = "One point per (query, removed training example); on the red line the score is exact."
        else:
            figure = plot_estimated_vs_actual(
                estimated - estimated.mean(axis=0, keepdims=True),
                actual - actual.mean(axis=0, keepdims=True),
                title="Predicted vs actual output on random half subsets",
                xlabel=f"actual loss after retraining on a subset, centred per query ({units})",
                ylabel=f"predicted by the scores, centred per query ({units})",
            )
            caption = (
                "One point per (subset, query), each centred per query: subsets certify the order of the scores "
                "(their correlation), not their units."
            )
        report.add_figure(figure, caption)
    if section["verdict"] != "trustworthy":
        report.add_paragraph(
            "When the verdict is poor: try another curvature route (--curvature gauss-newton or cg for a network), "
            "more damping (--damping), or a model trained closer to a minimum; rerun with --verify to compare."
        )


def summary_lines(section: dict[str, Any] | None) -> list[str]:
    """The printed summary's lines about the verification."""
    if section is None:
        return []
    if section["status"] != "verified":
        return ["", f"Accuracy: NOT VERIFIED. {section['reason']}"]
    return [
        "",
        f"Accuracy, checked by retraining {section['n_retrains']} models ({section['method']}): "
        f"{section['verdict'].upper()}.",
        f"  {section['explanation']}",
    ]
