"""Debug training data: find mislabelled, atypical and harmful training examples, and check by retraining.

Rankings of the training examples (sign convention of :mod:`datatrace.scores`: ``score[q, i] ~ f_q(theta_{-i}) -
f_q(theta_hat)``), named in :data:`RANKINGS`:

* **training loss** ``l_i = l(z_i, theta_hat)``, highest first: the default order of
  :attr:`DebugResult.suspicious_order`. A mislabelled example disagrees with what the model learnt from the rest
  of the data, so its loss is high: the small-loss criterion of learning with noisy labels (Arpit et al. 2017;
  Han et al. 2018). It is the default because nothing measured beats it everywhere: on networks trained as people
  train them (Adam, minibatches, float32, weight decay; two MLPs and a CNN on digits with 10% of the labels
  flipped, several flip seeds; ``benchmarks/bench_mislabel.py``, ``benchmarks/README.md``) it found the most flips
  on the models that fit few of their wrong labels, every self-influence route found fewer there, and the relative
  influence ``s_i / ||g_i||^2`` of Barshan et al. (2020), which discounts exactly the large-gradient examples a
  flipped label produces, found far fewer everywhere. It needs no curvature.
* **self-influence** ``s_i = (1/n) g_i^T H^{-1} g_i``: the estimated rise of example ``i``'s own loss if it were
  removed and the model retrained (Koh & Liang 2017, section 5.4; Pruthi et al. 2020). A model fits a mislabelled
  example it has memorised with a low loss, but removing it would raise that loss a lot. Always computed and kept
  (``rank_by="self_influence"``). On the benchmark's models that fit many of their flipped labels (trained long,
  or the CNN), self-influence from K-FAC / EK-FAC found a few more flips than the loss; from the Gauss-Newton
  matrix or the projected route it did not (the exact Hessian was too costly to run there).
* **leave-one-out loss** ``l_i + s_i``: to first order, the loss of example ``i`` under the model retrained
  without it (``l(z_i, theta_{-i}) ~ l(z_i, theta_hat) + s_i`` by the definition of ``s_i``): an approximate
  leave-one-out cross-validation loss (Giordano et al. 2019, the infinitesimal jackknife). ``rank_by="loo_loss"``;
  it keeps most of self-influence's gain where the model memorises and most of the loss's where it does not, and
  it assumes ``s_i`` in leave-one-out units (not the ``identity`` route's gradient dot products).
* **validation influence** ``v_i = sum_q score[q, i]`` over a validation set: the estimated change of the *total*
  validation loss if ``i`` were removed. ``v_i < 0``: removing ``i`` would *lower* the validation loss, so ``i``
  is harmful; the most negative first is the order in which to inspect or drop examples.

:func:`removal_check` then verifies a ranking the only way that counts: retrain without its top ``k`` and without
``k`` random examples, and compare a validation metric.

Example:
    >>> result = debug_data(influence, validation=(X_val, y_val))  # doctest: +SKIP
    >>> result.ranked_by, result.suspicious_order[:10]  # the ten examples most worth a look  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from datatrace.apps.common import (
    as_numpy,
    call_train,
    check_attributor,
    model_and_task,
    per_example,
    training_source,
)
from datatrace.attributors.base import Attributor
from datatrace.data import DataLike, as_data_source
from datatrace.errors import bad_value, check_choice, check_positive_int
from datatrace.verification.metrics import detection_curve

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RANKING",
    "RANKINGS",
    "DebugResult",
    "RemovalCheck",
    "debug_data",
    "detection_summary",
    "ranking_values",
    "removal_check",
]

#: the orders :func:`debug_data` can rank training examples by (``rank_by=``): name -> the measure, in words
RANKINGS: dict[str, str] = {
    "training_loss": "the training loss of each example under the trained model, highest first (a mislabelled "
    "example disagrees with what the model learnt from the rest; the small-loss criterion of Arpit et al. 2017 "
    "and Han et al. 2018)",
    "self_influence": "self-influence, highest first: the estimated rise of the example's own loss if it were "
    "removed and the model retrained (Koh & Liang 2017, section 5.4; Pruthi et al. 2020)",
    "loo_loss": "the leave-one-out loss, highest first: training loss plus self-influence, the first-order "
    "estimate of the example's loss under the model retrained without it (approximate leave-one-out "
    "cross-validation; Koh & Liang 2017; Giordano et al. 2019, the infinitesimal jackknife)",
}
#: what :func:`debug_data` ranks by unless told (module docstring: no self-influence route, relative influence or
#: combination beat the training loss on every realistic model in ``benchmarks/bench_mislabel.py``)
DEFAULT_RANKING = "training_loss"

DEBUG_MEANING = (
    "self_influence[i] estimates how much training example i's own loss would rise if it were removed and the "
    "model retrained (large: atypical, mislabelled or memorised). validation_influence[i] estimates the change "
    "of the TOTAL validation loss if i were removed: negative = removing i would lower the validation loss, so i "
    "is harmful; positive = i is helpful. Both are first-order leave-one-out estimates in the loss's units."
)


# --------------------------------------------------------------------------------------------------------------
# debug_data
# --------------------------------------------------------------------------------------------------------------
def ranking_values(by: str, training_loss: np.ndarray, self_influence: np.ndarray) -> np.ndarray:
    """The per-example values of ranking ``by`` (a key of :data:`RANKINGS`), higher = more suspicious:
    ``l_i``, ``s_i``, or the leave-one-out loss ``l_i + s_i`` (``l(z_i, theta_{-i}) ~ l(z_i, theta_hat) + s_i``
    to first order, by the definition of self-influence)."""
    check_choice("by", by, RANKINGS)
    if by == "training_loss":
        return training_loss
    if by == "self_influence":
        return self_influence
    return training_loss + self_influence


@dataclass
class DebugResult:
    """Per-training-example diagnostics from :func:`debug_data` (see :data:`DEBUG_MEANING` for the signs).

    Attributes:
        self_influence: ``(n,)`` estimated rise of example ``i``'s own loss if removed.
        validation_influence: ``(n,)`` estimated change of the *total* validation loss if ``i`` were removed
            (``Scores.total()``); negative = harmful. ``None`` without validation data.
        training_loss: ``(n,)`` each example's loss under the trained model.
        suspicious_order: ``(n,)`` example indices by decreasing ``ranked_by`` (ties: lower index first).
        harmful_order: ``(n,)`` example indices by increasing validation influence (most harmful first), or
            ``None``.
        ranked_by: the measure ``suspicious_order`` follows, a key of :data:`RANKINGS`.
        meaning: the conventions in words.
    """

    self_influence: np.ndarray
    validation_influence: np.ndarray | None
    training_loss: np.ndarray
    suspicious_order: np.ndarray
    harmful_order: np.ndarray | None
    ranked_by: str = DEFAULT_RANKING
    meaning: str = field(default=DEBUG_MEANING, repr=False)

    def __post_init__(self) -> None:
        check_choice("ranked_by", self.ranked_by, RANKINGS)

    @property
    def n(self) -> int:
        return int(self.self_influence.shape[0])

    @property
    def ranking_meaning(self) -> str:
        """What :attr:`suspicious_order` ranks by, in words (:data:`RANKINGS`)."""
        return RANKINGS[self.ranked_by]

    def values(self, by: str) -> np.ndarray:
        """The per-example values of ranking ``by`` (a key of :data:`RANKINGS`), higher = more suspicious."""
        return ranking_values(by, self.training_loss, self.self_influence)

    def order(self, by: str) -> np.ndarray:
        """Example indices by decreasing ranking ``by`` (a key of :data:`RANKINGS`; ties: lower index first),
        e.g. ``order("self_influence")`` whatever :attr:`ranked_by` is."""
        return np.argsort(-self.values(by), kind="stable")

    def harmful(self) -> np.ndarray:
        """Indices whose removal is estimated to lower the total validation loss (``validation_influence < 0``),
        most harmful first."""
        if self.validation_influence is None or self.harmful_order is None:
            raise ValueError(
                "this DebugResult has no validation influence. Fix: call debug_data(influence, validation=...)."
            )
        order = self.harmful_order
        return order[self.validation_influence[order] < 0]


def debug_data(
    influence: Attributor,
    validation: DataLike | None = None,
    train: DataLike | None = None,
    rank_by: str = DEFAULT_RANKING,
) -> DebugResult:
    """Training loss, self-influence and (with ``validation``) validation influence of every training example,
    and the order in which to inspect them.

    Args:
        influence: a fitted attributor with ``self_influence()`` and ``score(query)``.
        validation: held-out data ``(X, y)``; its scores are summed over the validation examples.
        train: the training data, needed only for attributors that do not keep it (an
            :class:`~datatrace.InfluenceFunction` does).
        rank_by: what :attr:`DebugResult.suspicious_order` ranks by, a key of :data:`RANKINGS`: the training loss
            (default, :data:`DEFAULT_RANKING`; module docstring), ``"self_influence"`` or ``"loo_loss"`` (their
            sum). Loss and self-influence are computed and kept either way.

    Returns:
        :class:`DebugResult`.
    """
    check_choice("rank_by", rank_by, RANKINGS)
    check_attributor(influence, "expected a fitted attributor with self_influence() and score(query)")
    self_inf = as_numpy(influence.self_influence(), "self_influence()").reshape(-1)
    n = self_inf.shape[0]
    model, task = model_and_task(influence)
    source = training_source(influence, train)
    if len(source) != n:
        raise bad_value(
            "train",
            train,
            f"it has {len(source)} examples but the attributor was fitted on {n}",
            "pass exactly the data the attributor was fitted on",
        )
    training_loss = per_example(model, task.loss, source, "train")
    val_inf = None
    harmful_order = None
    if validation is not None:
        val_inf = as_numpy(influence.score(validation).total(), "scores of the validation data").reshape(-1)
        harmful_order = np.argsort(val_inf, kind="stable")
    suspicious = np.argsort(-ranking_values(rank_by, training_loss, self_inf), kind="stable")
    logger.info(
        "debug_data: %d training examples ranked by %s; self-influence max %.3g, median %.3g%s",
        n,
        rank_by,
        float(self_inf.max()),
        float(np.median(self_inf)),
        "" if val_inf is None else f"; {int((val_inf < 0).sum())} estimated harmful to the validation loss",
    )
    return DebugResult(
        self_influence=self_inf,
        validation_influence=val_inf,
        training_loss=training_loss,
        suspicious_order=suspicious,
        harmful_order=harmful_order,
        ranked_by=rank_by,
    )


def detection_summary(
    result: DebugResult, flagged: Any, fractions: Sequence[float] = (0.05, 0.1, 0.2)
) -> dict[str, Any]:
    """How many of the ``flagged`` examples (e.g. known-mislabelled) each ranking finds in its top fractions.

    Rankings compared: ``"self_influence"`` (high first), ``"training_loss"`` (high first), ``"loo_loss"`` (only
    when it is ``result.ranked_by``), ``"validation_harm"`` (most negative validation influence first; only with validation data) and
    ``"random"`` (the expectation of a uniformly random order). Uses :func:`datatrace.verification.metrics.detection_curve`.

    Returns:
        ``{"n": n, "n_flagged": m, "fractions": [...], "ranked_by": the ranking of result.suspicious_order,
        "rankings": {name: {"auc": float, "found_at": {str(f): fraction of flagged found in the top ceil(f n)},
        "found_count": {str(f): count}}}}``.
    """
    if not isinstance(result, DebugResult):
        raise bad_value("result", result, "expected a DebugResult", "pass the output of debug_data(...)")
    flags = np.asarray(flagged.detach().cpu() if isinstance(flagged, torch.Tensor) else flagged)
    if flags.shape != (result.n,):
        raise bad_value(
            "flagged",
            flagged,
            f"expected one bool per training example, shape ({result.n},), got shape {flags.shape}",
            f"pass a bool array of length {result.n}",
        )
    try:  # a single number is one fraction
        fracs = [float(f) for f in np.atleast_1d(np.asarray(fractions, dtype=np.float64)).reshape(-1)]
    except (TypeError, ValueError):
        fracs = []
    if not fracs or any(not 0.0 < f <= 1.0 for f in fracs):
        raise bad_value("fractions", fractions, "expected numbers in (0, 1]", "pass e.g. (0.05, 0.1, 0.2)")
    rankings: dict[str, np.ndarray] = {
        name: result.values(name)
        for name in RANKINGS
        if name in ("self_influence", "training_loss") or name == result.ranked_by
    }
    if result.validation_influence is not None:
        rankings["validation_harm"] = -result.validation_influence
    out: dict[str, Any] = {"n": result.n, "fractions": fracs, "ranked_by": result.ranked_by, "rankings": {}}
    curves = {name: detection_curve(ranking, flags) for name, ranking in rankings.items()}
    for name, curve in curves.items():
        out["rankings"][name] = {
            "auc": float(curve.auc),
            "found_at": {str(f): float(curve.found_at(f)) for f in fracs},
            "found_count": {str(f): round(float(curve.found_at(f)) * curve.n_flagged) for f in fracs},
        }
    curve = curves["self_influence"]
    out["n_flagged"] = curve.n_flagged
    out["rankings"]["random"] = {
        "auc": 0.5,
        "found_at": {str(f): float(curve.random_found_at(f)) for f in fracs},
        "found_count": {str(f): float(curve.random_found_at(f)) * curve.n_flagged for f in fracs},
    }
    return out


# --------------------------------------------------------------------------------------------------------------
# removal_check
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RemovalCheck:
    """Actual retraining without the top ``k`` of a ranking, against retraining without ``k`` random examples.

    Attributes:
        k: examples removed.
        metric_before: ``evaluate_metric`` of ``train_fn(train)`` (all examples).
        metric_after_harmful: after retraining without the top ``k`` of the ranking.
        metric_after_random: one value per random draw of ``k`` examples.
        metric_name: what the metric is.
        removed: the ``k`` indices removed for ``metric_after_harmful``.
        random_removed: the indices removed in each random draw.
    """

    k: int
    metric_before: float
    metric_after_harmful: float
    metric_after_random: list[float]
    metric_name: str
    removed: np.ndarray | None = None
    random_removed: list[np.ndarray] = field(default_factory=list)

    @property
    def change_harmful(self) -> float:
        return self.metric_after_harmful - self.metric_before

    @property
    def change_random_mean(self) -> float:
        return float(np.mean(self.metric_after_random)) - self.metric_before

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "metric_name": self.metric_name,
            "metric_before": self.metric_before,
            "metric_after_harmful": self.metric_after_harmful,
            "metric_after_random": list(self.metric_after_random),
            "metric_after_random_mean": float(np.mean(self.metric_after_random))
            if self.metric_after_random
            else None,
            "removed": None if self.removed is None else self.removed.tolist(),
        }


def _removal_order(ranking: Any, n: int) -> np.ndarray:
    arr = np.asarray(ranking.detach().cpu() if isinstance(ranking, torch.Tensor) else ranking)
    if arr.ndim != 1 or arr.size == 0:
        raise bad_value(
            "ranking",
            ranking,
            "expected a 1-D sequence: example indices in removal order, or one score per example",
            "pass e.g. DebugResult.harmful_order",
        )
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() >= n or len(np.unique(arr)) != arr.size:
            raise bad_value(
                "ranking",
                ranking,
                f"integer rankings are example indices in removal order: unique and in [0, {n})",
                "pass e.g. DebugResult.harmful_order, or float scores (highest removed first)",
            )
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.shape != (n,) or not np.isfinite(arr).all():
            raise bad_value(
                "ranking",
                ranking,
                f"float rankings are one finite score per training example (shape ({n},)), highest removed first",
                "pass scores of the right length, or indices in removal order",
            )
        return np.argsort(-arr, kind="stable").astype(np.int64)
    raise bad_value("ranking", ranking, "expected integer indices or float scores", "pass a numpy array")


def removal_check(
    train_fn: Callable[..., Any],
    train: DataLike,
    evaluate_metric: Callable[[Any], float],
    ranking: Any,
    k: int,
    n_random: int = 3,
    random_state: int = 0,
    metric_name: str | None = None,
    metric_before: float | None = None,
) -> RemovalCheck:
    """Retrain without the top ``k`` of ``ranking`` and without ``k`` random examples; compare a metric.

    Args:
        train_fn: ``train_fn(train_subset) -> model`` (the subset in the same form as ``train``); called with
            ``seed=random_state`` when it accepts a ``seed`` argument, the same seed for every run.
        train: the training data.
        evaluate_metric: ``evaluate_metric(model) -> float``, e.g. validation accuracy or validation loss.
        ranking: integer example indices in removal order (e.g. :attr:`DebugResult.harmful_order`), or a float
            score per example (highest removed first).
        k: how many examples to remove.
        n_random: random draws of ``k`` examples to compare against (0: none).
        random_state: seed of the random draws.
        metric_name: words for the metric (default: the callable's name).
        metric_before: the metric of the model trained on all data, if already known (saves one training).

    Returns:
        :class:`RemovalCheck`.
    """
    if not callable(train_fn):
        raise bad_value(
            "train_fn", train_fn, "expected a callable train_fn(data) -> model", "pass a function"
        )
    if not callable(evaluate_metric):
        raise bad_value(
            "evaluate_metric", evaluate_metric, "expected a callable (model) -> float", "pass a function"
        )
    source = as_data_source(train, "train")
    n = len(source)
    check_positive_int("k", k)
    if k >= n:
        raise bad_value("k", k, f"must be smaller than the number of training examples ({n})", "pass fewer")
    check_positive_int("n_random", n_random, minimum=0)
    order = _removal_order(ranking, n)
    if order.size < k:
        raise bad_value("ranking", ranking, f"it names {order.size} examples, fewer than k={k}", "lower k")
    removed = np.sort(order[:k])
    name = metric_name or getattr(evaluate_metric, "__name__", "metric")

    def metric_without(drop: np.ndarray) -> float:
        keep = np.setdiff1d(np.arange(n), drop)
        model = call_train(train_fn, source.subset(keep), random_state)
        return float(evaluate_metric(model))

    if metric_before is None:
        metric_before = float(
            evaluate_metric(call_train(train_fn, source.subset(np.arange(n)), random_state))
        )
    after = metric_without(removed)
    rng = np.random.default_rng(random_state)
    random_drops = [np.sort(rng.choice(n, size=k, replace=False)) for _ in range(n_random)]
    after_random = [metric_without(d) for d in random_drops]
    logger.info(
        "removal_check: %s %.4g before, %.4g without the top %d, %s without %d random",
        name,
        metric_before,
        after,
        k,
        [round(v, 4) for v in after_random],
        k,
    )
    return RemovalCheck(
        k=int(k),
        metric_before=float(metric_before),
        metric_after_harmful=after,
        metric_after_random=after_random,
        metric_name=name,
        removed=removed,
        random_removed=random_drops,
    )
