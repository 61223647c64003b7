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
the tail. Self-influence spans decades (a confident model's typical example has ``s`` near 0, so a z-score on ``s``
itself divides by a collapsed MAD and flags a large share of the data), so the audit tests ``log s`` against its
bulk: a normal with the median and ``1.4826 MAD`` of ``log s`` (both unmoved by the tail), and example ``i`` is
flagged when its upper-tail probability ``P(Z > (log s_i - median) / scale)`` is below ``false_positive_rate``.
Where the bulk of ``log s`` is normal, an example of the bulk is flagged with that probability, so about
``false_positive_rate * n`` flags are expected by chance; where it is lighter-tailed (measured on data without
planted outliers, ``tests/apps/test_apps.py``) fewer. For each flagged example the audit estimates whether removing
it would flip its own prediction: its margin ``m_i = logit_{y_i} - max_{k != y_i} logit_k`` (for one logit,
``(2 y_i - 1) * logit``) is scored as a measurement, and the prediction flips when ``m_i`` and ``m_i + delta m_i``
differ in sign (Feldman 2020's memorisation: correct only when seen). :func:`confirm_memorisation` retrains without
a sample of the flagged examples and measures whether their own loss rises as estimated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from datatrace.apps.common import (
    as_numpy,
    check_attributor,
    model_and_task,
    per_example,
    prepare_query,
    training_source,
)
from datatrace.attributors.base import Attributor, check_index_set
from datatrace.data import DataLike, as_data_source
from datatrace.errors import bad_value, check_indices, check_positive_int
from datatrace.tasks import RegressionTask, Task
from datatrace.verification.retrain import evaluator, leave_one_out

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "FairnessAudit",
    "Margin",
    "MemorisationAudit",
    "MemorisationCheck",
    "PositiveProbability",
    "confirm_memorisation",
    "fairness_audit",
    "first_missing_label",
    "memorisation_audit",
    "tail_test",
]

METRICS = ("loss", "positive_rate")
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 sigma
#: default share of the bulk that the memorisation rule flags by chance (1 in 1,000 examples)
FALSE_POSITIVE_RATE = 1e-3
#: a retrain confirms a flagged example when its own loss rises by at least this share of the estimated rise
CONFIRM_SHARE = 0.5


# --------------------------------------------------------------------------------------------------------------
# Measurements (picklable callables (model, batch) -> (b,))
# --------------------------------------------------------------------------------------------------------------
def _labels(task: Task, batch: tuple | Mapping) -> torch.Tensor | None:
    """The class labels of a batch: ``batch[1]`` of a tuple, the task's target key of a dict (``target_key``, or a
    Hugging Face task's ``label_key``); None when there are none."""
    if isinstance(batch, Mapping):
        key = getattr(task, "target_key", None) or getattr(task, "label_key", None) or "labels"
        value = batch.get(key)
        return value if isinstance(value, torch.Tensor) else None
    return batch[1] if len(batch) > 1 else None


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
        y = _labels(self.task, batch).long().reshape(-1)  # checked to be whole numbers by memorisation_audit
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
        idx = check_index_set("indices", check_indices("indices", indices, len(self.effect)), indices)
        return float(self.gap + self.effect[idx.numpy()].sum())


def first_missing_label(labels: np.ndarray) -> int | None:
    """The position of the first ``None`` / NaN (pandas' missing values) in an object array of labels, or None."""
    if labels.dtype != object:
        return None
    return next((i for i, g in enumerate(labels.tolist()) if g is None or g != g), None)


def _group_weights(groups: Any, m: int, group_names: Sequence[Any] | None) -> tuple[np.ndarray, tuple, tuple]:
    arr = np.asarray(groups.detach().cpu() if isinstance(groups, torch.Tensor) else groups)
    if arr.ndim != 1 or arr.shape[0] != m:
        raise bad_value(
            "groups",
            groups,
            f"expected one group label per query example, shape ({m},), got shape {arr.shape}",
            f"pass an array of length {m} (the query's number of rows)",
        )
    missing = first_missing_label(arr)
    if missing is not None:
        raise bad_value(
            "groups",
            groups,
            f"every query example needs a group label, but groups[{missing}] is {arr[missing]!r}",
            "fill in the missing labels (e.g. groups.fillna('unknown')) or leave those examples out of the query",
        )
    if group_names is None:
        try:
            names = np.unique(arr)
        except TypeError:  # labels of mixed types (e.g. 1 and "1") cannot be sorted
            kinds = sorted({type(g).__name__ for g in arr.tolist()})
            raise bad_value(
                "groups",
                groups,
                f"group labels of mixed types {kinds} cannot be told apart reliably",
                "pass labels of one type (e.g. groups.astype(str)), or group_names=(A, B)",
            ) from None
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


def _positive_index(influence: Attributor, positive_class: Any) -> int:
    """The class index of ``positive_class``: a label of ``classes_`` for an attributor that encodes labels
    through them (a scikit-learn classifier: labels {1, 2, 5} or strings), else a class index; None: 1."""
    classes = getattr(influence, "classes_", None)
    if classes is not None:
        if positive_class is None:
            return 1
        labels = np.asarray(classes).tolist()
        if positive_class not in labels:
            raise bad_value(
                "positive_class",
                positive_class,
                f"for a scikit-learn classifier it is a label of the estimator's classes_ {labels[:20]}",
                f"pass one of those labels, e.g. positive_class={labels[-1]!r}",
            )
        return labels.index(positive_class)
    if positive_class is None:
        return 1
    if isinstance(positive_class, (bool, np.bool_)) or not isinstance(positive_class, (int, np.integer)):
        raise bad_value("positive_class", positive_class, "expected a class index (int)", "pass e.g. 1")
    return int(positive_class)


def fairness_audit(
    influence: Attributor,
    query: DataLike,
    groups: Any,
    metric: str = "loss",
    positive_class: Any = None,
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
        positive_class: the class whose rate is compared, for ``"positive_rate"``: a class index (default 1), or
            for an attributor of a scikit-learn classifier (:func:`datatrace.from_sklearn`) a label of the
            estimator's ``classes_``, as in its ``y`` (default ``classes_[1]``, scikit-learn's positive class).
        group_names: ``(A, B)``: the gap is ``A - B``. Default: the two distinct labels of ``groups``, sorted.

    Returns:
        :class:`FairnessAudit`.
    """
    if metric not in METRICS:
        raise bad_value(
            "metric", metric, f"expected one of {list(METRICS)}", "pass metric='loss' or 'positive_rate'"
        )
    check_attributor(influence, "expected a fitted attributor with score(query)")
    positive_index = _positive_index(influence, positive_class)
    model, task = model_and_task(influence)
    prepared = prepare_query(influence, query, "query")
    source = as_data_source(prepared, "query")
    weights, names, sizes = _group_weights(groups, len(source), group_names)
    if metric == "loss":
        measurement = _loss_measurement(task)
        fn = task.loss
        words = "the query's loss"
    else:
        if isinstance(task, RegressionTask):
            raise bad_value(
                "metric",
                metric,
                "'positive_rate' compares predicted class probabilities, but the model's task is a RegressionTask "
                "(its outputs are predictions, not logits)",
                "use metric='loss' for a regression model",
            )
        measurement = PositiveProbability(task, positive_index)
        if positive_class is not None and positive_index != positive_class:
            measurement.__name__ = f"predicted probability of class {positive_class!r}"
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
    rows = as_numpy(scores.values, "scores of the query")
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
    """Training examples whose self-influence lies beyond the tail of its bulk, and whether removing them would
    flip their prediction.

    Attributes:
        self_influence: ``(n,)`` estimated rise of each example's own loss if it were removed.
        zscores: ``(n,)`` ``(log s - log_median) / log_scale``, the standardised log self-influence (``-inf`` for
            ``s <= 0``, which cannot be memorised).
        pvalues: ``(n,)`` upper-tail probability of each z-score under the standard normal (1 for ``s <= 0``).
        flagged: indices with ``pvalue < false_positive_rate``, highest self-influence first.
        margin: ``(len(flagged),)`` each flagged example's own margin under the trained model (> 0: its label is
            predicted), or ``None`` when flips were not checked.
        estimated_own_margin_change: ``(len(flagged),)`` estimated change of that margin if the example were
            removed, or ``None``.
        prediction_flip: ``(len(flagged),)`` bool, ``sign(margin) != sign(margin + change)``: removing the example
            would change its own predicted label (it is predicted as it is only because it was trained on), or
            ``None``.
        false_positive_rate: the rule's rate: an example of a normal bulk is flagged with this probability.
        threshold: the self-influence above which an example is flagged (in the loss's units).
        log_median, log_scale: the bulk's centre and scale (median and 1.4826 MAD of ``log s``).
        expected_false_positives: ``false_positive_rate`` times the number of examples with ``s > 0``.
    """

    self_influence: np.ndarray
    zscores: np.ndarray
    pvalues: np.ndarray
    flagged: np.ndarray
    margin: np.ndarray | None
    estimated_own_margin_change: np.ndarray | None
    prediction_flip: np.ndarray | None
    false_positive_rate: float
    threshold: float
    log_median: float
    log_scale: float
    expected_false_positives: float

    @property
    def memorised(self) -> np.ndarray:
        """Flagged examples whose own prediction is estimated to flip if removed."""
        if self.prediction_flip is None:
            return self.flagged[:0]
        return self.flagged[self.prediction_flip]


def tail_test(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(z, pvalues, log_median, log_scale)``: ``log values`` standardised by their median and ``1.4826 MAD``
    (the mean absolute deviation times 1.2533 when the MAD is 0), and the normal upper-tail probability of each.

    Values ``<= 0`` get ``z = -inf`` and p-value 1.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    positive = values > 0
    z = np.full(values.shape, -np.inf)
    if not positive.any():
        logger.warning("memorisation_audit: no self-influence is positive; nothing can stand out.")
        return z, np.ones_like(values), float("nan"), float("nan")
    logs = np.log(values[positive])
    centre = float(np.median(logs))
    dev = np.abs(logs - centre)
    scale = MAD_TO_SIGMA * float(np.median(dev))
    if scale <= 0:
        scale = 1.2533 * float(dev.mean())  # mean absolute deviation of a normal is 0.7979 sigma
    if scale <= 0:
        logger.warning("memorisation_audit: every self-influence is equal; nothing can stand out.")
        z[positive] = 0.0
        return z, np.where(positive, 0.5, 1.0), centre, 0.0
    z[positive] = (logs - centre) / scale
    return z, norm.sf(z), centre, scale


def memorisation_audit(
    influence: Attributor,
    false_positive_rate: float = FALSE_POSITIVE_RATE,
    check_flips: bool = True,
    train: DataLike | None = None,
) -> MemorisationAudit:
    """Flag examples whose self-influence lies beyond the tail of its bulk and estimate whether their own
    prediction would flip (see the module docstring for the rule).

    Args:
        influence: a fitted attributor with ``self_influence()``; flip checks need ``score(query,
            measurement=...)`` (an :class:`~datatrace.InfluenceFunction`) and a classification model.
        false_positive_rate: in (0, 1): the probability that an example of a (log-normal) bulk is flagged; about
            ``false_positive_rate * n`` flags are expected by chance.
        check_flips: score each flagged example's own margin to estimate prediction flips.
        train: the training data, for attributors that do not keep it.

    Returns:
        :class:`MemorisationAudit`.
    """
    try:
        rate = float(false_positive_rate)
    except (TypeError, ValueError):
        raise bad_value(
            "false_positive_rate", false_positive_rate, "expected a number in (0, 1)", "pass e.g. 0.001"
        ) from None
    if not 0.0 < rate < 1.0:
        raise bad_value(
            "false_positive_rate", false_positive_rate, "expected a number in (0, 1)", "pass e.g. 0.001"
        )
    check_attributor(influence, "expected a fitted attributor with self_influence()")
    s = as_numpy(influence.self_influence(), "self_influence()").reshape(-1)
    z, pvalues, centre, scale = tail_test(s)
    flagged = np.flatnonzero(pvalues < rate)
    flagged = flagged[np.argsort(-s[flagged], kind="stable")]
    threshold = float(np.exp(centre + scale * norm.isf(rate))) if np.isfinite(centre) else float("inf")
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
        labels = _labels(task, subset.get(torch.arange(len(subset))))
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
        rows = as_numpy(influence.score(subset, measure).values, "margin scores")
        change = rows[np.arange(flagged.size), flagged]
        flip = np.sign(margin) != np.sign(margin + change)
    elif check_flips:
        margin, change, flip = np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    expected = rate * int((s > 0).sum())
    logger.info(
        "memorisation_audit: %d of %d examples above self-influence %.3g (false-positive rate %g: %.1f expected by "
        "chance)%s",
        flagged.size,
        s.size,
        threshold,
        rate,
        expected,
        "" if flip is None else f"; {int(flip.sum())} estimated to flip their own prediction if removed",
    )
    return MemorisationAudit(
        self_influence=s,
        zscores=z,
        pvalues=pvalues,
        flagged=flagged,
        margin=margin,
        estimated_own_margin_change=change,
        prediction_flip=flip,
        false_positive_rate=rate,
        threshold=threshold,
        log_median=centre,
        log_scale=scale,
        expected_false_positives=expected,
    )


class _OwnLoss:
    """A task whose measurement is the loss (picklable), for measuring flagged examples' own loss."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def measurement(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        return self.task.loss(model, batch)


@dataclass(frozen=True)
class MemorisationCheck:
    """Flagged examples retrained without, one at a time: does their own loss rise as estimated?

    Attributes:
        indices: the flagged training examples that were left out (a seeded sample when there are many).
        estimated: their self-influence, the estimated rise of their own loss.
        actual: the measured rise (own loss of the model retrained without the example minus that of the model
            retrained on everything).
        confirmed: ``actual >= CONFIRM_SHARE * estimated``: the own loss rose by at least half as much as
            estimated.
        n_flagged: how many examples the audit flagged in all.
    """

    indices: np.ndarray
    estimated: np.ndarray
    actual: np.ndarray
    confirmed: np.ndarray
    n_flagged: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        ratio = self.actual / np.where(self.estimated > 0, self.estimated, np.nan)
        return {
            "n_flagged": self.n_flagged,
            "n_checked": int(self.indices.size),
            "n_confirmed": int(self.confirmed.sum()),
            "rule": f"confirmed when the actual rise of its own loss is >= {CONFIRM_SHARE:g} x the estimated rise",
            "median_actual_over_estimated": float(np.nanmedian(ratio)) if ratio.size else None,
            "indices": self.indices.tolist(),
            "estimated": self.estimated.tolist(),
            "actual": self.actual.tolist(),
            "confirmed": self.confirmed.tolist(),
        }


def confirm_memorisation(
    audit: MemorisationAudit,
    train_fn: Callable[..., Any],
    train: DataLike,
    task: Task,
    *,
    n_retrains: int = 20,
    random_state: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> MemorisationCheck:
    """Retrain without flagged examples, one at a time, and measure the rise of each one's own loss.

    Args:
        audit: a :class:`MemorisationAudit`.
        train_fn: ``train_fn(subset)`` (or with ``seed=``) returning a trained ``nn.Module``, the way the model
            was trained (see :func:`datatrace.verification.retrain.leave_one_out`).
        train: the training data the audit's attributor was fitted on.
        task: the task whose loss the self-influence estimates.
        n_retrains: how many flagged examples to check (a seeded random sample when more are flagged); one more
            model is trained on all the data.
        random_state: seed of the sample.
        cache_dir, progress: as in :func:`~datatrace.verification.retrain.leave_one_out` (``cache_dir`` makes an
            interrupted check resumable).
    """
    n_retrains = check_positive_int("n_retrains", n_retrains)
    flagged = np.asarray(audit.flagged, dtype=np.int64)
    if flagged.size == 0:
        empty = np.zeros(0)
        return MemorisationCheck(flagged, empty, empty, np.zeros(0, dtype=bool), 0)
    rng = np.random.default_rng(random_state)
    sample = flagged if flagged.size <= n_retrains else rng.choice(flagged, n_retrains, replace=False)
    sample = np.sort(sample)
    source = as_data_source(train, "train")
    own = as_data_source(source.subset(torch.as_tensor(sample)), "train")
    result = leave_one_out(
        train_fn,
        train,
        evaluator(_OwnLoss(task), own),
        sample,
        cache_dir=cache_dir,
        progress=progress,
    )
    actual = result.changes[np.arange(sample.size), np.arange(sample.size)]
    estimated = audit.self_influence[sample]
    confirmed = actual >= CONFIRM_SHARE * estimated
    logger.info(
        "confirm_memorisation: %d of %d flagged examples checked by retraining are confirmed",
        int(confirmed.sum()),
        sample.size,
    )
    return MemorisationCheck(sample, estimated, actual, confirmed, int(flagged.size))
