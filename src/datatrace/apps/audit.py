"""Audits: which training examples drive a fairness gap, and which ones the model memorised.

**Fairness.** For query examples split into two groups ``A`` and ``B`` and a per-example measurement ``f_q`` (the
loss, or the predicted probability of a positive class), the gap is

    gap = mean_{q in A} f_q - mean_{q in B} f_q.

It is a linear combination ``sum_q c_q f_q`` of per-query measurements (``c_q = 1/|A|`` on ``A``, ``-1/|B|`` on
``B``), so by linearity its leave-one-out influence is the same combination of score rows:

    effect_i = sum_q c_q score[q, i]  ~  gap(theta_{-i}) - gap(theta_hat),

the estimated change of the gap if training example ``i`` were removed and the model retrained. Removing ``i``
narrows ``|gap|`` (to first order) when ``sign(gap) * effect_i < 0``.

**Memorisation.** Self-influence ``s_i`` is the estimated rise of example ``i``'s own loss if it were removed; an
example that the model fits only because it saw it (a mislabelled copy, an outlier) has a self-influence far in
the tail. The audit flags robust z-scores ``(s_i - median) / (1.4826 MAD)`` above a threshold and, for each flagged
example, estimates whether removing it would flip its own prediction: its margin ``m_i = logit_{y_i} -
max_{k != y_i} logit_k`` (for one logit, ``(2 y_i - 1) * logit``) is scored as a measurement, and the prediction
flips when ``m_i`` and ``m_i + delta m_i`` differ in sign (Feldman 2020's memorisation: correct only when seen).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.apps.common import (
    as_numpy,
    check_attributor,
    model_and_task,
    per_example,
    prepare_query,
    training_source,
)
from datatrace.attributors.base import Attributor
from datatrace.data import DataLike, as_data_source
from datatrace.errors import bad_value
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "FairnessAudit",
    "Margin",
    "MemorisationAudit",
    "PositiveProbability",
    "fairness_audit",
    "memorisation_audit",
]

METRICS = ("loss", "positive_rate")
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 sigma


# --------------------------------------------------------------------------------------------------------------
# Measurements (picklable callables (model, batch) -> (b,))
# --------------------------------------------------------------------------------------------------------------
def _outputs(task: Task, model: nn.Module, batch: tuple) -> torch.Tensor:
    return task.outputs(model, batch) if task.has_outputs else model(batch[0])


class PositiveProbability:
    """The predicted probability of ``positive_class``: softmax of the outputs, or the sigmoid of one logit."""

    def __init__(self, task: Task, positive_class: int) -> None:
        self.task = task
        self.positive_class = positive_class
        self.__name__ = f"predicted probability of class {positive_class}"

    def __call__(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        out = _outputs(self.task, model, batch)
        c = self.positive_class
        if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
            logit = out.reshape(-1)
            if c not in (0, 1):
                raise bad_value(
                    "positive_class",
                    c,
                    "the model has one logit (binary), so classes are 0 and 1",
                    "pass 0 or 1",
                )
            return torch.sigmoid(logit) if c == 1 else torch.sigmoid(-logit)
        if out.dim() != 2:
            raise ValueError(
                f"positive_rate needs outputs of shape (batch, classes), got {tuple(out.shape)}. Fix: use "
                "metric='loss' or a task whose outputs are logits."
            )
        if not 0 <= c < out.shape[1]:
            raise bad_value(
                "positive_class",
                c,
                f"the model has {out.shape[1]} classes (0 to {out.shape[1] - 1})",
                "pass a class index the model predicts",
            )
        return torch.softmax(out, dim=1)[:, c]


class Margin:
    """``logit_y - max_{k != y} logit_k`` (one logit: ``(2y - 1) * logit``): positive when ``y`` is predicted."""

    __name__ = "margin of the example's own label (logit of its label minus the largest other logit)"

    def __init__(self, task: Task) -> None:
        self.task = task

    def __call__(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        out = _outputs(self.task, model, batch)
        y = batch[1].long().reshape(-1)  # checked to be whole class numbers by memorisation_audit
        if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
            return (2.0 * y.to(out.dtype) - 1.0) * out.reshape(-1)
        own = out.gather(1, y.unsqueeze(1)).squeeze(1)
        is_own = torch.arange(out.shape[1], device=out.device).unsqueeze(0) == y.unsqueeze(1)
        others = torch.where(is_own, torch.full_like(out, float("-inf")), out)
        return own - others.max(dim=1).values


def _loss_measurement(task: Task) -> Any:
    """``None`` when the task's measurement already is its loss, else the loss as a measurement."""
    if type(task).measurement is Task.measurement:
        return None
    return task.loss


# --------------------------------------------------------------------------------------------------------------
# Fairness
# --------------------------------------------------------------------------------------------------------------
@dataclass
class FairnessAudit:
    """Influence of every training example on a gap between two groups of queries.

    Attributes:
        gap: ``metric(A) - metric(B)`` under the trained model.
        group_names: ``(A, B)``.
        effect: ``(n,)`` estimated change of the gap if training example ``i`` were removed and the model
            retrained (``sum_q c_q score[q, i]``).
        drivers_increasing: indices of the examples that *widen* ``|gap|``: removing them would reduce ``|gap|``
            (``sign(gap) * effect < 0``), the largest reduction first. Positive gaps (and a zero gap) count as
            ``sign = +1``.
        drivers_decreasing: indices of the examples that *narrow* ``|gap|``: removing them would widen it
            (``sign(gap) * effect > 0``), the largest widening first.
        group_values: ``(metric(A), metric(B))``.
        group_sizes: ``(|A|, |B|)``.
        weights: ``(n_query,)`` the coefficients ``c_q`` of the gap in the per-query measurements.
        metric: ``"loss"`` or ``"positive_rate"``.
        measurement: words for the per-query measurement.
        meaning: the sign convention in words.
    """

    gap: float
    group_names: tuple[Any, Any]
    effect: np.ndarray
    drivers_increasing: np.ndarray
    drivers_decreasing: np.ndarray
    group_values: tuple[float, float]
    group_sizes: tuple[int, int]
    weights: np.ndarray
    metric: str
    measurement: str
    meaning: str = field(default="", repr=False)

    def predicted_gap_without(self, indices: Any) -> float:
        """First-order gap after removing the set ``indices`` together: ``gap + sum_{i in S} effect_i``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return float(self.gap + self.effect[idx].sum())


def _group_weights(groups: Any, m: int, group_names: Sequence[Any] | None) -> tuple[np.ndarray, tuple, tuple]:
    arr = np.asarray(groups.detach().cpu() if isinstance(groups, torch.Tensor) else groups)
    if arr.ndim != 1 or arr.shape[0] != m:
        raise bad_value(
            "groups",
            groups,
            f"expected one group label per query example, shape ({m},), got shape {arr.shape}",
            f"pass an array of length {m} (the query's number of rows)",
        )
    if group_names is None:
        names = np.unique(arr)
        if names.size != 2:
            raise bad_value(
                "groups",
                groups,
                f"expected exactly two distinct group labels, found {names.size} ({names.tolist()[:10]})",
                "binarise the labels, or pass group_names=(A, B) to compare two of them",
            )
        a, b = names.tolist()
    else:
        if isinstance(group_names, (str, bytes)) or len(group_names) != 2:
            raise bad_value("group_names", group_names, "expected a pair (A, B)", "pass e.g. ('f', 'm')")
        a, b = group_names
        if a == b:
            raise bad_value("group_names", group_names, "the two groups must differ", "pass two labels")
    in_a, in_b = arr == a, arr == b
    for name, mask in ((a, in_a), (b, in_b)):
        if not mask.any():
            raise bad_value(
                "group_names" if group_names is not None else "groups",
                group_names if group_names is not None else groups,
                f"group {name!r} has no query examples",
                "pass labels that occur in groups",
            )
    weights = in_a / in_a.sum() - in_b / in_b.sum()
    return weights.astype(np.float64), (a, b), (int(in_a.sum()), int(in_b.sum()))


def fairness_audit(
    influence: Attributor,
    query: DataLike,
    groups: Any,
    metric: str = "loss",
    positive_class: int = 1,
    group_names: Sequence[Any] | None = None,
) -> FairnessAudit:
    """Estimate how removing each training example would change the gap of ``metric`` between two groups.

    Args:
        influence: a fitted :class:`~datatrace.InfluenceFunction` (``"positive_rate"`` needs ``score(query,
            measurement=...)``; ``"loss"`` works with any attributor whose measurement is the loss).
        query: the audit data (e.g. a test set), ``(X, y)``.
        groups: one group label per query example.
        metric: ``"loss"`` (mean loss per group) or ``"positive_rate"`` (mean predicted probability of
            ``positive_class``: the smooth version of the rate of positive predictions).
        positive_class: the class whose rate is compared, for ``"positive_rate"``.
        group_names: ``(A, B)``: the gap is ``A - B``. Default: the two distinct labels of ``groups``, sorted.

    Returns:
        :class:`FairnessAudit`.
    """
    if metric not in METRICS:
        raise bad_value(
            "metric", metric, f"expected one of {list(METRICS)}", "pass metric='loss' or 'positive_rate'"
        )
    if isinstance(positive_class, bool) or not isinstance(positive_class, (int, np.integer)):
        raise bad_value("positive_class", positive_class, "expected a class index (int)", "pass e.g. 1")
    check_attributor(influence, "expected a fitted attributor with score(query)")
    model, task = model_and_task(influence)
    prepared = prepare_query(influence, query, "query")
    source = as_data_source(prepared, "query")
    weights, names, sizes = _group_weights(groups, len(source), group_names)
    if metric == "loss":
        measurement = _loss_measurement(task)
        fn = task.loss
        words = "the query's loss"
    else:
        measurement = PositiveProbability(task, int(positive_class))
        fn = measurement
        words = measurement.__name__
    if measurement is not None and not influence.supports_measurement:
        raise bad_value(
            "influence",
            influence,
            f"metric={metric!r} needs an attributor whose score accepts measurement=",
            "use datatrace.InfluenceFunction, or metric='loss' with a task whose measurement is its loss",
        )
    values = per_example(model, fn, source, "query")
    # the attributor encodes labels itself (SklearnInfluence): score the query as given, not `prepared`
    scores = influence.score(query, measurement)
    rows = as_numpy(scores.values)
    effect = weights @ rows
    gap = float(weights @ values)
    in_a, in_b = weights > 0, weights < 0
    sign = -1.0 if gap < 0 else 1.0
    signed = sign * effect
    order = np.argsort(signed, kind="stable")
    increasing = order[signed[order] < 0]
    decreasing = order[::-1][signed[order[::-1]] > 0]
    meaning = (
        f"gap = mean {words} over group {names[0]!r} minus over group {names[1]!r}. effect[i] estimates "
        "gap(theta without i) - gap(theta_hat): the change of the gap if training example i were removed and the "
        "model retrained (first order; the same combination of score rows). drivers_increasing: removing them "
        "would reduce |gap| (largest reduction first); drivers_decreasing: removing them would widen |gap|."
    )
    logger.info(
        "fairness_audit: %s gap %.4g (%s %.4g vs %s %.4g); %d examples widen |gap|, %d narrow it",
        metric,
        gap,
        names[0],
        float(values[in_a].mean()),
        names[1],
        float(values[in_b].mean()),
        increasing.size,
        decreasing.size,
    )
    return FairnessAudit(
        gap=gap,
        group_names=names,
        effect=effect,
        drivers_increasing=increasing,
        drivers_decreasing=decreasing,
        group_values=(float(values[in_a].mean()), float(values[in_b].mean())),
        group_sizes=sizes,
        weights=weights,
        metric=metric,
        measurement=words,
        meaning=meaning,
    )


# --------------------------------------------------------------------------------------------------------------
# Memorisation
# --------------------------------------------------------------------------------------------------------------
@dataclass
class MemorisationAudit:
    """Training examples with outlying self-influence, and whether removing them would flip their prediction.

    Attributes:
        self_influence: ``(n,)`` estimated rise of each example's own loss if it were removed.
        zscores: ``(n,)`` robust z-scores ``(s - median) / (1.4826 MAD)``.
        flagged: indices with ``zscore > z_threshold``, highest first.
        margin: ``(len(flagged),)`` each flagged example's own margin under the trained model (> 0: its label is
            predicted), or ``None`` when flips were not checked.
        estimated_own_margin_change: ``(len(flagged),)`` estimated change of that margin if the example were
            removed, or ``None``.
        prediction_flip: ``(len(flagged),)`` bool, ``sign(margin) != sign(margin + change)``: removing the example
            would change its own predicted label (it is predicted as it is only because it was trained on), or
            ``None``.
        z_threshold, median, mad: the rule's numbers.
    """

    self_influence: np.ndarray
    zscores: np.ndarray
    flagged: np.ndarray
    margin: np.ndarray | None
    estimated_own_margin_change: np.ndarray | None
    prediction_flip: np.ndarray | None
    z_threshold: float
    median: float
    mad: float

    @property
    def memorised(self) -> np.ndarray:
        """Flagged examples whose own prediction is estimated to flip if removed."""
        if self.prediction_flip is None:
            return self.flagged[:0]
        return self.flagged[self.prediction_flip]


def robust_zscores(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(values - median) / (1.4826 MAD)``; falls back to the mean absolute deviation when MAD is 0."""
    median = float(np.median(values))
    dev = np.abs(values - median)
    mad = float(np.median(dev))
    scale = MAD_TO_SIGMA * mad
    if scale <= 0:
        scale = 1.2533 * float(dev.mean())  # mean absolute deviation of a normal is 0.7979 sigma
    if scale <= 0:
        logger.warning("memorisation_audit: every self-influence is equal; nothing can stand out.")
        return np.zeros_like(values), median, mad
    return (values - median) / scale, median, mad


def memorisation_audit(
    influence: Attributor,
    z_threshold: float = 3.0,
    check_flips: bool = True,
    train: DataLike | None = None,
) -> MemorisationAudit:
    """Flag examples whose self-influence is an outlier and estimate whether their own prediction would flip.

    Args:
        influence: a fitted attributor with ``self_influence()``; flip checks need ``score(query,
            measurement=...)`` (an :class:`~datatrace.InfluenceFunction`) and a classification model.
        z_threshold: robust z-score above which an example is flagged.
        check_flips: score each flagged example's own margin to estimate prediction flips.
        train: the training data, for attributors that do not keep it.

    Returns:
        :class:`MemorisationAudit`.
    """
    try:
        threshold = float(z_threshold)
    except (TypeError, ValueError):
        raise bad_value("z_threshold", z_threshold, "expected a number", "pass e.g. 3.0") from None
    if not np.isfinite(threshold):
        raise bad_value("z_threshold", z_threshold, "expected a finite number", "pass e.g. 3.0")
    check_attributor(influence, "expected a fitted attributor with self_influence()")
    s = as_numpy(influence.self_influence()).reshape(-1)
    z, median, mad = robust_zscores(s)
    flagged = np.flatnonzero(z > threshold)
    flagged = flagged[np.argsort(-z[flagged], kind="stable")]
    margin = change = flip = None
    if check_flips and flagged.size:
        if not influence.supports_measurement:
            raise bad_value(
                "influence",
                influence,
                "prediction-flip checks need an attributor whose score accepts measurement=",
                "use datatrace.InfluenceFunction, or pass check_flips=False",
            )
        model, task = model_and_task(influence)
        source = training_source(influence, train)
        subset = as_data_source(source.subset(torch.as_tensor(flagged)), "train")
        labels = subset.get(torch.arange(len(subset)))[1] if len(subset.get([0])) > 1 else None
        if (
            labels is None
            or not isinstance(labels, torch.Tensor)
            or (labels.is_floating_point() and not bool((labels == labels.round()).all()))
        ):
            raise bad_value(
                "check_flips",
                check_flips,
                "prediction flips need classification data (x, integer label)",
                "pass check_flips=False for a regression task",
            )
        measure = Margin(task)
        margin = per_example(model, measure, subset, "train")
        rows = as_numpy(influence.score(subset, measure).values)
        change = rows[np.arange(flagged.size), flagged]
        flip = np.sign(margin) != np.sign(margin + change)
    elif check_flips:
        margin, change, flip = np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    logger.info(
        "memorisation_audit: %d of %d examples above robust z %.3g%s",
        flagged.size,
        s.size,
        threshold,
        "" if flip is None else f"; {int(flip.sum())} estimated to flip their own prediction if removed",
    )
    return MemorisationAudit(
        self_influence=s,
        zscores=z,
        flagged=flagged,
        margin=margin,
        estimated_own_margin_change=change,
        prediction_flip=flip,
        z_threshold=threshold,
        median=median,
        mad=mad,
    )
