"""One call that measures how good an attributor's scores are *here*, by retraining, and says what to do with them.

Influence estimates can be excellent on a convex model and near useless on a network far from a minimum; the only
way to know is to retrain. :func:`verify` retrains on a random sample and compares:

* **leave-one-out** when one removal moves the model measurably: the training function is run twice with two
  seeds on the same data; if the change it measures for one removal differs between the seeds by less than
  ``noise_ratio`` (0.25) of the spread of the estimated effects, retraining is precise enough to check the scores
  number for number (a noise-to-signal ratio ``r`` attenuates a correlation by ``1 / sqrt(1 + r^2)``: 3% at 0.25).
  Agreement: Pearson / Spearman per query (:func:`datatrace.verification.metrics.loo_correlation`) and a
  calibration slope (actual on estimated, centred per query, so the per-query shift of retraining a mean loss on
  ``n - 1`` examples drops out);
* **random half subsets** otherwise (large ``n``, stochastic training): the linear datamodeling score (Park et al.
  2023, :func:`datatrace.verification.metrics.lds`) with the retraining noise ceiling from two seeds per subset;
* **single-model subsets** for an attributor whose scores estimate removals from its recorded run
  (:class:`~datatrace.attributors.metagradient.Metagradient`): the run replayed without random subsets of
  ``1 - SINGLE_MODEL_FRACTION`` (10%) of the examples (:func:`datatrace.verification.retrain.single_model_subsets`;
  no ``train_fn``, no retraining noise), the LDS and a calibration slope of the actual changes on the predicted ones.

The verdict, with these thresholds (chosen on the benchmarks of ``benchmarks/README.md``: the exact route reaches
LOO Pearson 0.995 on logistic regression, where sizes can be read; on the realistic catalogue's Adam-trained
networks the Hessian and EK-FAC routes reach LDS 0.55-0.67 of ceilings 0.8-0.94 (rankings that hold) and
gradient dot products anywhere from 0.06 (the CNN) to 0.52 (tabular); ``benchmarks/bench_verify.py --catalogue``
checks that the verdict of a 60-retrain sample matches the one the full benchmark's LDS gives on every route and problem):

* ``"trustworthy"``: leave-one-out Pearson >= 0.9 and calibration slope in [0.5, 2]: the scores can be read in
  their units;
* ``"trustworthy"`` (single-model): LDS >= 0.9 and calibration slope in [0.5, 2];
* ``"use rankings only"``: leave-one-out Spearman >= 0.5, or LDS >= 0.3 and >= half its correlation ceiling: the
  order of the scores is informative, their size is not certified;
* ``"not trustworthy here"``: below those;
* ``"inconclusive"``: the retraining noise ceiling is too low (correlation ceiling < 0.3) to judge anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datatrace.data import DataLike, as_data_source
from datatrace.errors import (
    RetrainCacheError,
    bad_value,
    check_bool,
    check_choice,
    check_nonnegative_float,
    check_positive_int,
    check_random_state,
)
from datatrace.verification.metrics import calibration_slope, lds, loo_correlation
from datatrace.verification.retrain import (
    LOOResult,
    SubsetResult,
    evaluator,
    leave_one_out,
    single_model_subsets,
    subsets,
)

__all__ = ["VERDICTS", "Verification", "verify"]

logger = logging.getLogger(__name__)

VERDICTS = ("trustworthy", "use rankings only", "not trustworthy here", "inconclusive")
#: thresholds of the verdict (see the module docstring for where they come from)
LOO_PEARSON_TRUSTWORTHY = 0.9
SLOPE_RANGE = (0.5, 2.0)
LOO_SPEARMAN_RANKINGS = 0.5
LDS_RANKINGS = 0.3
LDS_CEILING_FRACTION = 0.5
MIN_CORRELATION_CEILING = 0.3
SINGLE_MODEL_LDS_TRUSTWORTHY = 0.9
#: share of the examples each single-model subset keeps (a removal of 10%: a first-order estimate's scale)
SINGLE_MODEL_FRACTION = 0.9

_RUN_ADVICE = (
    "What to try: the recorded run is not linear in its data at this scale. ReLU-like activations and max-pooling "
    "make it jump under any reweighting (Scores.metadata['non_smooth_operations']) and BatchNorm amplifies "
    "perturbations (benchmarks/README.md, bench_metagradient.py); a network with smooth activations (GELU, SiLU, "
    "tanh) and without BatchNorm is, and an influence function may rank better here."
)

_ADVICE = (
    "What to try: another curvature route (curvature='gauss-newton' or 'cg' for a network whose Hessian is "
    "indefinite), more damping, or a model trained closer to a minimum (the influence function assumes one); "
    "compare routes with this same call."
)


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` measured.

    Attributes:
        method: ``"leave-one-out"``, ``"subsets"`` or ``"single-model"``.
        reason: why that method was chosen, in words.
        verdict: one of :data:`VERDICTS`.
        explanation: the verdict's numbers against its thresholds, in words, with what to try when it is poor.
        agreement: the numbers: ``mean_pearson``, ``mean_spearman``, ``pooled_pearson``, ``calibration_slope``
            (leave-one-out), ``lds``, ``noise_ceiling``, ``correlation_ceiling`` (subsets) or ``lds``,
            ``calibration_slope`` (single-model), plus ``retrain_noise`` and ``effect_spread`` of the method choice.
        n_retrains: how many models were trained (or runs replayed).
        estimated: for leave-one-out the ``(n_query, m)`` estimated changes of the sampled examples; for subsets
            the ``(n_subsets, n_query)`` predicted outputs (up to a per-query constant).
        actual: the matching measured changes (leave-one-out) or seed-averaged (single-model: replayed) outputs.
        truth: the raw retraining result (:class:`~datatrace.verification.retrain.LOOResult` or
            :class:`~datatrace.verification.retrain.SubsetResult`).
    """

    method: str
    reason: str
    verdict: str
    explanation: str
    agreement: dict[str, float | None]
    n_retrains: int
    estimated: np.ndarray = field(repr=False)
    actual: np.ndarray = field(repr=False)
    truth: LOOResult | SubsetResult = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the arrays)."""
        return {
            "method": self.method,
            "reason": self.reason,
            "verdict": self.verdict,
            "explanation": self.explanation,
            "agreement": dict(self.agreement),
            "n_retrains": self.n_retrains,
        }


def verify(
    attributor: Any,
    train: DataLike,
    train_fn: Callable[..., Any] | None,
    query: DataLike,
    *,
    scores: Any = None,
    method: str = "auto",
    n_retrains: int = 60,
    n_seeds: int = 2,
    loo_max_n: int = 5000,
    noise_ratio: float = 0.25,
    random_state: int = 0,
    n_jobs: int | None = 1,
    backend: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Verification:
    """Retrain on a random sample and measure how well ``attributor``'s scores on ``query`` agree.

    Args:
        attributor: a fitted attributor (``score(query)`` returning :class:`~datatrace.Scores`, and a ``task``
            whose ``measurement`` the scores estimate, the query's loss by default).
        train: the training data the attributor was fitted on (columns of the scores).
        train_fn: ``train_fn(data)`` or ``train_fn(data, seed=...)`` returning a trained model, the way the
            model was trained (see :func:`datatrace.verification.retrain.leave_one_out`); ``None`` for
            ``"single-model"``, where the recording is the training function.
        query: the queries (rows of the scores).
        scores: the attributor's scores on ``query`` if already computed (else computed here).
        method: ``"auto"`` (single-model for an attributor of a recorded run; else leave-one-out when
            retraining is precise enough, else subsets), ``"leave-one-out"``, ``"subsets"`` or ``"single-model"``.
        n_retrains: the retraining budget: leave-one-out removes this many random examples (plus 3 models for
            the noise check); subsets trains ``n_retrains // n_seeds`` half subsets with ``n_seeds`` seeds each;
            single-model replays the run ``n_retrains`` times.
        n_seeds: seeds per subset (2 gives the noise ceiling).
        loo_max_n: above this many training examples ``"auto"`` goes straight to subsets (one removal moves a
            model trained on many examples by ~1/n, below the precision of most training runs).
        noise_ratio: the largest retraining noise, relative to the spread of the estimated effects, at which
            ``"auto"`` takes leave-one-out.
        random_state: seed of the sample of examples and subsets.
        n_jobs, backend, cache_dir, progress: as in :func:`~datatrace.verification.retrain.leave_one_out`
            (``cache_dir`` makes an interrupted verification resumable).

    Returns:
        a :class:`Verification` with the method, the agreement, the verdict and its explanation.
    """
    method = check_choice("method", method, ("auto", "leave-one-out", "subsets", "single-model"))
    noise_ratio = check_nonnegative_float("noise_ratio", noise_ratio)
    random_state = check_random_state(random_state)
    progress = check_bool("progress", progress)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise bad_value(
            "cache_dir", cache_dir, "expected a folder path (str or os.PathLike)", "pass e.g. 'verify-cache'"
        )
    n_retrains = check_positive_int("n_retrains", n_retrains, minimum=4)
    n_seeds = check_positive_int("n_seeds", n_seeds)
    loo_max_n = check_positive_int("loo_max_n", loo_max_n)
    if not callable(getattr(attributor, "score", None)):
        raise bad_value(
            "attributor",
            attributor,
            "expected a fitted attributor with score(query)",
            "pass e.g. datatrace.InfluenceFunction(model, task).fit(train)",
        )
    task = getattr(attributor, "task", None)
    source = as_data_source(train, "train")
    n = len(source)
    values = _score_values(attributor if scores is None else None, query, scores)
    if values.shape[1] != n:
        raise bad_value(
            "train",
            train,
            f"the scores have {values.shape[1]} columns but train has {n} examples",
            "pass the training data the attributor was fitted on",
        )
    evaluate = evaluator(task, query)
    rng = np.random.default_rng(random_state)
    sample = np.sort(rng.choice(n, size=min(n_retrains, n), replace=False))
    cache = None if cache_dir is None else Path(cache_dir)
    common = dict(n_jobs=n_jobs, backend=backend, progress=progress)

    recorded = bool(getattr(attributor, "removal_from_recorded_run", False))
    if method == "single-model" and not recorded:
        raise bad_value(
            "method",
            method,
            "'single-model' checks an attributor of a recorded run (Metagradient), whose scores estimate removals "
            f"from that run; {type(attributor).__name__} estimates retraining",
            "use method='auto', 'leave-one-out' or 'subsets' with a train_fn",
        )
    if method == "auto" and recorded:
        method = "single-model"
    if method != "single-model" and not callable(train_fn):
        raise bad_value(
            "train_fn",
            train_fn,
            f"method {method!r} retrains: a function train_fn(data) or train_fn(data, seed=...) returning a trained "
            "model",
            "pass the function that trains the model (for a Metagradient, method='single-model' needs none)",
        )

    reason, noise, spread = "", None, None
    probe: list[LOOResult] = []
    if method == "single-model":
        reason = (
            "the scores estimate removals from the attributor's recorded run (same initialisation, order and seeds), "
            "so that run replayed without random subsets is their ground truth"
        )
    elif method == "subsets":
        reason = "subsets were asked for"
    elif method == "leave-one-out":
        reason = "leave-one-out was asked for"
    elif n > loo_max_n:
        method = "subsets"
        reason = (
            f"{n:,} training examples > loo_max_n={loo_max_n:,}: one removal moves the model by about 1/n, below "
            "the precision of most training runs"
        )
    else:
        for seed in (0, 1):
            probe.append(
                leave_one_out(
                    train_fn,
                    train,
                    evaluate,
                    sample[:1],
                    seed=seed,
                    cache_dir=_sub(cache, f"probe-{seed}"),
                    **common,
                )
            )
        noise = _rms(probe[1].changes[:, 0] - probe[0].changes[:, 0])
        spread = _centred_rms(values[:, sample])
        if noise <= noise_ratio * spread:
            method = "leave-one-out"
            reason = (
                f"retraining with two seeds measures one removal's effect to within {noise:.2e}, below "
                f"{noise_ratio:g} x the spread of the estimated effects ({spread:.2e}): leave-one-out differences "
                "can be compared number for number"
            )
        else:
            method = "subsets"
            reason = (
                f"retraining with two seeds changes one removal's measured effect by {noise:.2e}, more than "
                f"{noise_ratio:g} x the spread of the estimated effects ({spread:.2e}): leave-one-out differences "
                "would be mostly noise, so random half subsets (averaged over seeds) are used"
            )
    logger.info("verify: %s (%s)", method, reason)

    agreement: dict[str, float | None] = {"retrain_noise": noise, "effect_spread": spread}
    if method == "leave-one-out":
        base = probe[0].base if probe else None
        rest = sample[1:] if probe else sample
        truth = (
            probe[0]
            if probe and not len(rest)
            else leave_one_out(
                train_fn,
                train,
                evaluate,
                rest,
                seed=0,
                base_outputs=base,
                cache_dir=_sub(cache, "loo"),
                **common,
            )
        )
        if probe and len(rest):
            truth = LOOResult(
                indices=np.concatenate([probe[0].indices, truth.indices]),
                base=truth.base,
                retrained=np.concatenate([probe[0].retrained, truth.retrained], axis=1),
                changes=np.concatenate([probe[0].changes, truth.changes], axis=1),
            )
        n_trained = len(truth.indices) + (3 if probe else 1)
        estimated = values[:, truth.indices]
        corr = loo_correlation(estimated, truth.changes)
        slope = _float(calibration_slope(estimated, truth.changes))
        agreement.update(
            mean_pearson=_float(corr.mean_pearson),
            mean_spearman=_float(corr.mean_spearman),
            pooled_pearson=_float(corr.pooled_pearson),
            calibration_slope=slope,
        )
        verdict, explanation = _loo_verdict(agreement)
        actual = truth.changes
    elif method == "single-model":
        truth = single_model_subsets(
            attributor.model,
            task,
            attributor.recording,
            train,
            evaluate,
            n_subsets=n_retrains,
            fraction=SINGLE_MODEL_FRACTION,
            random_state=random_state,
            cache_dir=_sub(cache, "single-model"),
            **common,
        )
        n_trained = n_retrains
        result = lds(values, truth.masks, truth.outputs)
        estimated, actual = result.predicted, result.actual
        agreement.update(
            lds=_float(result.mean), calibration_slope=_float(calibration_slope(estimated.T, actual.T))
        )
        verdict, explanation = _single_model_verdict(agreement)
    else:
        n_subsets = max(2, n_retrains // n_seeds)
        truth = subsets(
            train_fn,
            train,
            evaluate,
            n_subsets=n_subsets,
            n_seeds=n_seeds,
            random_state=random_state,
            cache_dir=_sub(cache, "subsets"),
            **common,
        )
        n_trained = n_subsets * n_seeds + sum(2 for _ in probe)
        result = lds(values, truth.masks, truth.outputs)
        agreement.update(
            lds=_float(result.mean),
            noise_ceiling=_float(result.noise_ceiling),
            correlation_ceiling=_float(result.correlation_ceiling),
        )
        verdict, explanation = _lds_verdict(agreement)
        estimated, actual = result.predicted, result.actual
    return Verification(method, reason, verdict, explanation, agreement, n_trained, estimated, actual, truth)


def _score_values(attributor: Any, query: DataLike, scores: Any) -> np.ndarray:
    out = attributor.score(query) if attributor is not None else scores
    values = getattr(out, "values", out)
    values = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    if values.ndim != 2:
        raise bad_value("scores", scores, "expected an (n_query, n_train) matrix or Scores", "pass Scores")
    return values.astype(np.float64)


def _first_tier(numbers: str, tiers: list[tuple[bool, str, str]], poor: str) -> tuple[str, str]:
    """``(verdict, numbers: why)`` of the first tier whose condition holds, else ``"not trustworthy here"``."""
    for holds, verdict, why in tiers:
        if holds:
            return verdict, f"{numbers}: {why}"
    return "not trustworthy here", f"{numbers}: {poor}"


def _slope_in_range(slope: float | None) -> bool:
    """Whether a calibration slope says the scores are in their units (within :data:`SLOPE_RANGE`)."""
    low, high = SLOPE_RANGE
    return slope is not None and low <= slope <= high


def _at_least(value: float | None, threshold: float) -> bool:
    return value is not None and value >= threshold


def _loo_verdict(a: dict[str, float | None]) -> tuple[str, str]:
    r, rho, slope = a["mean_pearson"], a["mean_spearman"], a["calibration_slope"]
    low, high = SLOPE_RANGE
    return _first_tier(
        f"leave-one-out Pearson {_fmt(r)}, Spearman {_fmt(rho)}, calibration slope {_fmt(slope)}",
        [
            (
                _at_least(r, LOO_PEARSON_TRUSTWORTHY) and _slope_in_range(slope),
                "trustworthy",
                f"Pearson >= {LOO_PEARSON_TRUSTWORTHY} and slope in [{low:g}, {high:g}], so the scores can be read "
                "in their units (the estimated change of the query's measurement when an example is removed).",
            ),
            (
                _at_least(rho, LOO_SPEARMAN_RANKINGS),
                "use rankings only",
                f"Spearman >= {LOO_SPEARMAN_RANKINGS} but Pearson < {LOO_PEARSON_TRUSTWORTHY} or the slope outside "
                f"[{low:g}, {high:g}]: the order of the scores is informative, their size is not. " + _ADVICE,
            ),
        ],
        f"Spearman < {LOO_SPEARMAN_RANKINGS}, so the scores do not follow retraining here. " + _ADVICE,
    )


def _lds_verdict(a: dict[str, float | None]) -> tuple[str, str]:
    value, ceiling = a["lds"], a["correlation_ceiling"]
    return _first_tier(
        f"LDS {_fmt(value)} (correlation ceiling of the retraining noise {_fmt(ceiling)})",
        [
            (
                ceiling is not None and ceiling < MIN_CORRELATION_CEILING,
                "inconclusive",
                f"retraining is so noisy that even perfect scores could reach only about {_fmt(ceiling)}; raise "
                "n_seeds or n_retrains, or make training deterministic (fixed seed and data order).",
            ),
            (
                _at_least(value, LDS_RANKINGS)
                and (ceiling is None or value >= LDS_CEILING_FRACTION * ceiling),
                "use rankings only",
                f"LDS >= {LDS_RANKINGS} and >= {LDS_CEILING_FRACTION:g} x the ceiling, so the scores rank training "
                "examples (and sets of them) usefully; subsets cannot certify their units.",
            ),
        ],
        f"below LDS {LDS_RANKINGS} or half the ceiling, so the scores barely predict retraining. " + _ADVICE,
    )


def _single_model_verdict(a: dict[str, float | None]) -> tuple[str, str]:
    value, slope = a["lds"], a["calibration_slope"]
    low, high = SLOPE_RANGE
    return _first_tier(
        f"single-model LDS {_fmt(value)}, calibration slope {_fmt(slope)} (the recorded run replayed without "
        f"{1 - SINGLE_MODEL_FRACTION:.0%} of the examples)",
        [
            (
                _at_least(value, SINGLE_MODEL_LDS_TRUSTWORTHY) and _slope_in_range(slope),
                "trustworthy",
                f"LDS >= {SINGLE_MODEL_LDS_TRUSTWORTHY} and slope in [{low:g}, {high:g}], so the scores predict "
                "removals from this run in their units (other seeds or data orders are not covered).",
            ),
            (
                _at_least(value, LDS_RANKINGS),
                "use rankings only",
                f"LDS >= {LDS_RANKINGS} but below {SINGLE_MODEL_LDS_TRUSTWORTHY} or the slope outside "
                f"[{low:g}, {high:g}]: the order of the scores is informative, their size is not. "
                + _RUN_ADVICE,
            ),
        ],
        f"below LDS {LDS_RANKINGS}, so the scores barely predict removals from this run. " + _RUN_ADVICE,
    )


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _centred_rms(x: np.ndarray) -> float:
    return _rms(x - x.mean(axis=1, keepdims=True))


def _float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _sub(cache: Path | None, name: str) -> Path | None:
    """``cache / name``, refused if it is a link or leads outside ``cache`` (a sub-cache stays inside its folder)."""
    if cache is None:
        return None
    path = cache / name
    if path.is_symlink() or (path.exists() and not path.resolve().is_relative_to(cache.resolve())):
        raise RetrainCacheError(
            f"cache_dir={str(cache)!r}: its sub-cache {name!r} is a link to {str(path.resolve())!r}; verify keeps "
            "every retrain cache inside cache_dir and never writes through a link. Fix: remove the link, or use a "
            "new cache_dir."
        )
    return path
