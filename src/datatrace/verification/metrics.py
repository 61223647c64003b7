"""Metrics that check influence scores against retraining, and measure how useful a ranking is.

Scores follow the library's sign convention (:data:`datatrace.scores.MEANING`): a leave-one-out difference,
comparable number for number with the changes retraining measures.

Functions
---------
:func:`pearson`, :func:`spearman`
    Row-wise correlation coefficients (vectorised; constant rows give ``nan``).
:func:`loo_correlation`
    Correlation between estimated and actual (retrained) leave-one-out changes, per query and pooled.
:func:`calibration_slope`
    Whether estimated changes are in the units of the actual ones (slope 1), centred per query.
:func:`lds`
    The linear datamodeling score (Park et al., 2023) with a split-half noise ceiling.
:func:`detection_curve`
    The fraction of flagged examples (e.g. known-mislabelled) found against the fraction inspected.

All functions accept torch tensors, numpy arrays or nested lists, and return ``numpy.float64`` values inside
frozen dataclasses whose arrays are read-only.

References
----------
* S. M. Park, K. Georgiev, A. Ilyas, G. Leclerc, A. Madry. "TRAK: Attributing Model Behavior at Scale",
  ICML 2023 (the linear datamodeling score, section 2).
* A. Ilyas, S. M. Park, L. Engstrom, G. Leclerc, A. Madry. "Datamodels: Predicting Predictions from Training
  Data", ICML 2022.
* C. Spearman (1910), W. Brown (1910): the Spearman-Brown prediction formula for split-half reliability.
* C. Spearman (1904). "The proof and measurement of association between two things" (correction for
  attenuation: a measure cannot correlate with a noisy criterion better than ``sqrt(reliability)``).
* P. W. Koh, P. Liang. "Understanding Black-box Predictions via Influence Functions", ICML 2017 (leave-one-out
  correlation and mislabelled-example detection as evaluations).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from datatrace.errors import bad_value
from datatrace.scores import Scores

logger = logging.getLogger(__name__)

__all__ = [
    "DetectionCurve",
    "LDSResult",
    "LOOCorrelation",
    "calibration_slope",
    "detection_curve",
    "lds",
    "loo_correlation",
    "pearson",
    "spearman",
]


# --------------------------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------------------------


def _to_numpy(name: str, value: Any) -> np.ndarray:
    """A fresh numpy copy of a tensor / array / nested list (no memory shared with the caller); a
    :class:`~datatrace.Scores` gives its ``values``."""
    if isinstance(value, Scores):
        value = value.values
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.is_complex():
            raise bad_value(name, value, "complex values are not supported", "pass real numbers")
        if tensor.dtype == torch.bool:
            return tensor.numpy().copy()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.double()  # bfloat16 / float16 have no (or a lossy) numpy path
        return tensor.numpy().copy()
    try:
        array = np.array(value, copy=True)
    except (TypeError, ValueError):
        raise bad_value(
            name, value, "expected a torch tensor, numpy array or nested list of numbers", "convert it first"
        ) from None
    return array


def _as_float(name: str, value: Any, ndims: tuple[int, ...], shape_words: str) -> np.ndarray:
    """Convert to a finite float64 array whose number of dimensions is one of ``ndims``."""
    array = _to_numpy(name, value)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise bad_value(
            name,
            value,
            f"expected real numbers, got dtype {array.dtype}",
            "pass a float tensor or numeric numpy array",
        )
    if array.ndim not in ndims:
        raise bad_value(
            name,
            value,
            f"expected shape {shape_words}, got {array.ndim} dimension(s) with shape {array.shape}",
            f"reshape it to {shape_words}",
        )
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise bad_value(
            name,
            value,
            f"every value must be finite, but {int(bad.sum())} are NaN or inf (first at index {first}: "
            f"{array[first]})",
            "drop or recompute the non-finite entries",
        )
    return array


def _as_bool(name: str, value: Any, ndim: int, shape_words: str) -> np.ndarray:
    """Convert to a bool array; numeric input must hold only 0 and 1."""
    array = _to_numpy(name, value)
    if array.ndim != ndim:
        raise bad_value(
            name,
            value,
            f"expected shape {shape_words}, got {array.ndim} dimension(s) with shape {array.shape}",
            f"reshape it to {shape_words}",
        )
    if array.dtype == np.bool_:
        return array
    if array.dtype == object or array.dtype.kind not in "iuf":
        raise bad_value(name, value, f"expected booleans, got dtype {array.dtype}", "pass a bool array")
    if not np.isin(array, (0, 1)).all():
        raise bad_value(
            name,
            value,
            "expected booleans (or numbers that are all 0 or 1)",
            "pass a bool array, e.g. `array != 0`",
        )
    return array.astype(bool)


def _freeze(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _nanmean_with_warning(values: np.ndarray, what: str, reason: str, context: str) -> np.float64:
    """Mean of the finite entries, logging a warning that says how many were left out and why."""
    finite = np.isfinite(values)
    n_bad = int((~finite).sum())
    if n_bad:
        logger.warning(
            "%s: %d of %d queries give nan for %s (%s); they are left out of the mean.",
            context,
            n_bad,
            values.size,
            what,
            reason,
        )
    if not finite.any():
        return np.float64(np.nan)
    return np.float64(values[finite].mean())


# --------------------------------------------------------------------------------------------------------------
# Row-wise correlation
# --------------------------------------------------------------------------------------------------------------


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (2-D float64, already checked).

    A row that is constant (max == min) in either input gives nan.
    """
    constant = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    # Scale each row by its largest magnitude before centring (avoids overflow for huge values).
    scale_a = np.abs(a).max(axis=1, keepdims=True)
    scale_b = np.abs(b).max(axis=1, keepdims=True)
    scale_a[scale_a == 0] = 1.0
    scale_b[scale_b == 0] = 1.0
    ca = a / scale_a
    cb = b / scale_b
    ca = ca - ca.mean(axis=1, keepdims=True)
    cb = cb - cb.mean(axis=1, keepdims=True)
    num = np.einsum("ij,ij->i", ca, cb)
    den = np.sqrt(np.einsum("ij,ij->i", ca, ca) * np.einsum("ij,ij->i", cb, cb))
    out = np.full(a.shape[0], np.nan)
    ok = ~constant & (den > 0)
    out[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    return out


def _rank_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks) along the last axis."""
    return rankdata(a, method="average", axis=-1).astype(np.float64)


def _paired_rows(a: Any, b: Any, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, bool]:
    name_a, name_b = names
    x = _as_float(name_a, a, (1, 2), "(m,) or (n_rows, m)")
    y = _as_float(name_b, b, (1, 2), "(m,) or (n_rows, m)")
    if x.shape != y.shape:
        raise bad_value(
            name_b,
            b,
            f"it must have the same shape as {name_a}, which is {x.shape}, but its shape is {y.shape}",
            f"pass paired values: {name_b} with shape {x.shape}",
        )
    one_d = x.ndim == 1
    if one_d:
        x, y = x[None, :], y[None, :]
    if x.shape[1] < 2:
        raise bad_value(
            name_a,
            a,
            f"a correlation needs at least 2 paired values per row, got {x.shape[1]}",
            "pass rows with 2 or more values",
        )
    return x, y, one_d


def pearson(a: Any, b: Any) -> np.float64 | np.ndarray:
    r"""Pearson correlation of ``a`` with ``b``, row by row.

    .. math:: r = \frac{\sum_j (a_j - \bar a)(b_j - \bar b)}{\sqrt{\sum_j (a_j - \bar a)^2 \sum_j (b_j - \bar b)^2}}

    Args:
        a, b: paired values of the same shape, ``(m,)`` or ``(n_rows, m)`` with ``m >= 2``.

    Returns:
        A ``numpy.float64`` for 1-D input, else a float64 array of shape ``(n_rows,)``. A row that is constant in
        ``a`` or ``b`` has no defined correlation and gives ``nan``.
    """
    x, y, one_d = _paired_rows(a, b, ("a", "b"))
    out = _pearson_rows(x, y)
    return np.float64(out[0]) if one_d else out


def spearman(a: Any, b: Any) -> np.float64 | np.ndarray:
    """Spearman rank correlation of ``a`` with ``b``, row by row.

    The Pearson correlation of the ranks, with tied values given the average of their ranks
    (``scipy.stats.rankdata(method="average")``), which matches ``scipy.stats.spearmanr``.

    Args:
        a, b: paired values of the same shape, ``(m,)`` or ``(n_rows, m)`` with ``m >= 2``.

    Returns:
        A ``numpy.float64`` for 1-D input, else a float64 array of shape ``(n_rows,)``; ``nan`` for a constant
        row.
    """
    x, y, one_d = _paired_rows(a, b, ("a", "b"))
    out = _pearson_rows(_rank_rows(x), _rank_rows(y))
    return np.float64(out[0]) if one_d else out


def calibration_slope(estimated: Any, actual: Any) -> np.float64:
    r"""Least-squares slope of ``actual`` on ``estimated``, both centred row by row, pooled over the rows.

    .. math:: b = \frac{\sum_{q,j} (e_{qj} - \bar e_q)(a_{qj} - \bar a_q)}{\sum_{q,j} (e_{qj} - \bar e_q)^2}

    1 when the estimates are in the units of what they estimate; centring each row (a query) drops a per-query
    constant (retraining a mean loss on fewer examples shifts every removal alike; an LDS prediction is known up to
    one). Rows: queries; columns: removed examples (leave-one-out) or subsets (``LDSResult.predicted.T``).

    Args:
        estimated, actual: paired values of the same shape, ``(m,)`` or ``(n_rows, m)`` with ``m >= 2``.

    Returns:
        ``numpy.float64``; ``nan`` when every row of ``estimated`` is constant.
    """
    x, y, _ = _paired_rows(estimated, actual, ("estimated", "actual"))
    e = x - x.mean(axis=1, keepdims=True)
    d = y - y.mean(axis=1, keepdims=True)
    denom = float((e * e).sum())
    return np.float64(float((e * d).sum()) / denom) if denom > 0 else np.float64(np.nan)


# --------------------------------------------------------------------------------------------------------------
# Leave-one-out correlation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LOOCorrelation:
    """How well estimated leave-one-out (LOO) changes match changes measured by retraining.

    Attributes:
        pearson: ``(n_query,)`` Pearson correlation, across the ``m`` training examples, between the estimated
            and the actual LOO change of each query. ``nan`` where either row is constant.
        spearman: ``(n_query,)`` Spearman rank correlation (average ranks for ties), ``nan`` likewise.
        mean_pearson: mean of ``pearson`` over the queries where it is finite (``nan`` if none is).
        mean_spearman: mean of ``spearman`` over the queries where it is finite (``nan`` if none is).
        pooled_pearson: one Pearson correlation over all ``n_query * m`` (query, example) pairs flattened. It
            also rewards getting the scale of each query's effects right, which per-query correlations ignore.
        n_query: number of queries.
    """

    pearson: np.ndarray
    spearman: np.ndarray
    mean_pearson: np.float64
    mean_spearman: np.float64
    pooled_pearson: np.float64
    n_query: int


def loo_correlation(estimated: Any, actual: Any) -> LOOCorrelation:
    """Correlate estimated leave-one-out changes with the actual changes from retraining.

    Args:
        estimated: ``(n_query, m)`` estimated change of each query's measurement when each of ``m`` training
            examples is removed (``scores[:, idx]`` for the ``m`` examples that were retrained without). A 1-D
            ``(m,)`` input means one query.
        actual: the same shape: ``f_q(theta_{-i}) - f_q(theta_hat)`` measured by retraining without each
            example.

    Returns:
        :class:`LOOCorrelation`. Queries whose estimated or actual row is constant get ``nan`` and are left out
        of the means, with a warning logged on this module's logger.

    Raises:
        ValueError: naming the argument, for shape mismatch, fewer than 2 examples, or non-finite values.
    """
    est, act, _ = _paired_rows(estimated, actual, ("estimated", "actual"))
    per_pearson = _pearson_rows(est, act)
    per_spearman = _pearson_rows(_rank_rows(est), _rank_rows(act))
    reason = "the estimated or actual row is constant"
    mean_p = _nanmean_with_warning(per_pearson, "pearson", reason, "loo_correlation")
    mean_s = _nanmean_with_warning(per_spearman, "spearman", reason, "loo_correlation")
    pooled = np.float64(_pearson_rows(est.reshape(1, -1), act.reshape(1, -1))[0])
    if np.isnan(pooled):
        logger.warning(
            "loo_correlation: pooled_pearson is nan because all estimated or all actual values are equal."
        )
    return LOOCorrelation(
        pearson=_freeze(per_pearson),
        spearman=_freeze(per_spearman),
        mean_pearson=mean_p,
        mean_spearman=mean_s,
        pooled_pearson=pooled,
        n_query=int(est.shape[0]),
    )


# --------------------------------------------------------------------------------------------------------------
# Linear datamodeling score
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LDSResult:
    r"""The linear datamodeling score (LDS) of a score matrix, with a noise ceiling.

    For each retrained subset :math:`S_j` (``masks[j]``) the scores predict query ``q``'s measurement as

    .. math:: \hat g_q(S_j) = \sum_{i \notin S_j} \mathrm{scores}[q, i]

    (first order: the model on :math:`S_j` is the full model with the complement removed; the constant
    :math:`f_q(\hat\theta)` is dropped because it does not change a rank correlation). The LDS of query ``q`` is
    the Spearman correlation, across the ``m`` subsets, between :math:`\hat g_q(S_j)` and the actual measurement
    averaged over seeds.

    Attributes:
        per_query: ``(n_query,)`` LDS of each query; ``nan`` where the prediction or the actual measurement is
            constant across subsets.
        mean: mean of ``per_query`` over the finite entries (``nan`` if none).
        predicted: ``(m, n_query)`` the predictions :math:`\hat g_q(S_j)`.
        actual: ``(m, n_query)`` the outputs averaged over seeds.
        n_seeds: number of retraining seeds per subset (1 for 2-D ``outputs``).
        split_half_per_query: ``(n_query,)`` raw split-half Spearman correlation ``r`` between the seed-averaged
            outputs of the first ``n_seeds // 2`` seeds and of the remaining seeds; ``None`` if ``n_seeds < 2``.
        noise_ceiling_per_query: ``(n_query,)`` estimated reliability of the full-seed average,
            ``2 r / (1 + r)`` (Spearman-Brown), with ``r <= 0`` reported as 0; ``nan`` where a half is constant;
            ``None`` if ``n_seeds < 2``.
        noise_ceiling: mean of the finite entries of ``noise_ceiling_per_query``; ``None`` if ``n_seeds < 2``.

    What the ceiling means: the ground truth is itself noisy (retraining with another seed gives different
    outputs). If ``rho`` is the reliability of the seed-averaged ground truth (the correlation it would have with
    an independent copy of itself), then by Spearman's correction for attenuation even a perfect estimator of
    the noise-free expected output is expected to reach an LDS of only about ``sqrt(rho)``. ``noise_ceiling`` is
    ``rho`` itself; :attr:`correlation_ceiling` is ``sqrt(rho)``, the rough best LDS to hope for. Both are
    estimates: with an odd ``n_seeds`` the halves are unequal (the second half gets the extra seed) and the
    Spearman-Brown formula assumes equal halves, and rank correlations only approximately follow the
    classical-test-theory algebra.
    """

    per_query: np.ndarray
    mean: np.float64
    predicted: np.ndarray
    actual: np.ndarray
    n_seeds: int
    split_half_per_query: np.ndarray | None
    noise_ceiling_per_query: np.ndarray | None
    noise_ceiling: np.float64 | None

    @property
    def correlation_ceiling(self) -> np.float64 | None:
        """``sqrt(noise_ceiling)``: roughly the best mean LDS a perfect estimator can be expected to reach."""
        if self.noise_ceiling is None:
            return None
        return np.float64(np.sqrt(max(float(self.noise_ceiling), 0.0)))


def lds(scores: Any, masks: Any, outputs: Any) -> LDSResult:
    """Linear datamodeling score (Park et al., 2023) of ``scores`` against models retrained on subsets.

    Args:
        scores: ``(n_query, n_train)`` influence scores in the library's convention (``scores[q, i]`` estimates
            the change of query ``q``'s measurement when example ``i`` is removed). 1-D means one query.
        masks: ``(m, n_train)`` bool; ``masks[j, i]`` is True when example ``i`` was kept in subset ``j``.
        outputs: ``(m, n_query)`` or ``(m, n_seeds, n_query)``: query ``q``'s measurement for the model
            retrained on subset ``j`` (with each seed). ``(m,)`` is accepted when there is one query.

    Returns:
        :class:`LDSResult` (see it for the exact definitions, including the noise ceiling).

    Raises:
        ValueError: naming the argument, for inconsistent shapes, fewer than 2 subsets, non-boolean masks or
            non-finite values.
    """
    s = _as_float("scores", scores, (1, 2), "(n_query, n_train)")
    if s.ndim == 1:
        s = s[None, :]
    n_query, n_train = s.shape
    if n_query == 0 or n_train == 0:
        raise bad_value(
            "scores",
            scores,
            f"it must hold at least one query and one training example, got shape {s.shape}",
            "pass scores with shape (n_query, n_train), both at least 1",
        )
    m_arr = _as_bool("masks", masks, 2, "(m, n_train)")
    if m_arr.shape[1] != n_train:
        raise bad_value(
            "masks",
            masks,
            f"it needs one column per training example, i.e. n_train={n_train} columns as in scores, "
            f"but has {m_arr.shape[1]}",
            f"pass masks with shape (m, {n_train})",
        )
    m = m_arr.shape[0]
    if m < 2:
        raise bad_value(
            "masks",
            masks,
            f"LDS is a correlation across subsets and needs m >= 2, got m={m}",
            "pass more subsets",
        )
    out = _as_float("outputs", outputs, (1, 2, 3), "(m, n_query) or (m, n_seeds, n_query)")
    given_shape = out.shape
    if out.ndim == 1:
        if n_query != 1:
            raise bad_value(
                "outputs",
                outputs,
                f"1-D outputs are only allowed for one query, but scores has n_query={n_query}",
                f"pass outputs with shape ({m}, {n_query}) or ({m}, n_seeds, {n_query})",
            )
        out = out[:, None]
    if out.ndim == 2:
        out = out[:, None, :]
    if out.shape[0] != m or out.shape[2] != n_query:
        raise bad_value(
            "outputs",
            outputs,
            f"expected shape ({m}, {n_query}) or ({m}, n_seeds, {n_query}) to match masks (m={m}) and scores "
            f"(n_query={n_query}), got {given_shape}",
            "put subsets on the first axis and queries on the last",
        )
    n_seeds = out.shape[1]
    if n_seeds == 0:
        raise bad_value("outputs", outputs, "n_seeds must be at least 1, got 0", "pass at least one seed")

    removed = (~m_arr).astype(np.float64)
    predicted = removed @ s.T  # (m, n_query)
    actual = out.mean(axis=1)  # (m, n_query)
    per_query = _pearson_rows(_rank_rows(predicted.T), _rank_rows(actual.T))
    mean = _nanmean_with_warning(
        per_query, "LDS", "the predicted or actual output is constant across subsets", "lds"
    )

    split_half = ceiling_per_query = ceiling = None
    if n_seeds >= 2:
        half = n_seeds // 2
        first = out[:, :half, :].mean(axis=1)
        second = out[:, half:, :].mean(axis=1)
        split_half = _pearson_rows(_rank_rows(first.T), _rank_rows(second.T))
        ceiling_per_query = np.full(n_query, np.nan)
        ok = np.isfinite(split_half)
        r = np.clip(split_half[ok], 0.0, 1.0)
        ceiling_per_query[ok] = 2.0 * r / (1.0 + r)
        ceiling = _nanmean_with_warning(
            ceiling_per_query, "the noise ceiling", "a half of the seeds is constant across subsets", "lds"
        )
        split_half = _freeze(split_half)
        ceiling_per_query = _freeze(ceiling_per_query)

    return LDSResult(
        per_query=_freeze(per_query),
        mean=mean,
        predicted=_freeze(predicted),
        actual=_freeze(actual),
        n_seeds=int(n_seeds),
        split_half_per_query=split_half,
        noise_ceiling_per_query=ceiling_per_query,
        noise_ceiling=ceiling,
    )


# --------------------------------------------------------------------------------------------------------------
# Detection curve
# --------------------------------------------------------------------------------------------------------------


def _check_fraction(fraction: Any) -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise bad_value("fraction", fraction, "expected a number between 0 and 1", "pass e.g. 0.1") from None
    if not 0.0 <= value <= 1.0:
        raise bad_value("fraction", fraction, "expected a number between 0 and 1", "pass e.g. 0.1")
    return value


@dataclass(frozen=True, eq=False)
class DetectionCurve:
    """How quickly inspecting examples in ranking order finds the flagged ones.

    Examples are inspected in decreasing ``ranking``; ties are broken by index, lower index first (a stable
    sort), so the curve is deterministic.

    Attributes:
        fraction_inspected: ``(n + 1,)`` ``k / n`` for ``k = 0 .. n``.
        fraction_found: ``(n + 1,)`` fraction of the flagged examples among the first ``k`` inspected.
        auc: area under ``fraction_found`` against ``fraction_inspected`` (trapezoid rule), in ``[0, 1]``. A
            random order gives 0.5 in expectation; a perfect ranking gives ``1 - n_flagged / (2 n)``.
        order: ``(n,)`` the inspection order (example indices).
        n: number of examples.
        n_flagged: number of flagged examples.
    """

    fraction_inspected: np.ndarray
    fraction_found: np.ndarray
    auc: np.float64
    order: np.ndarray
    n: int
    n_flagged: int

    def _k(self, fraction: Any) -> int:
        x = _check_fraction(fraction) * self.n
        nearest = round(x)
        if abs(x - nearest) <= 1e-9 * max(1.0, x):  # k/n given as a float must not round up to k+1
            return int(nearest)
        return math.ceil(x)

    def found_at(self, fraction: Any) -> np.float64:
        """Fraction of the flagged examples found after inspecting the top ``ceil(fraction * n)`` examples."""
        return np.float64(self.fraction_found[self._k(fraction)])

    def random_found_at(self, fraction: Any) -> np.float64:
        """The expected :meth:`found_at` for a uniformly random order: ``k / n`` with ``k = ceil(fraction * n)``."""
        return np.float64(self._k(fraction) / self.n)


def detection_curve(ranking: Any, flagged: Any) -> DetectionCurve:
    """The detection curve of ``ranking`` for finding ``flagged`` examples (e.g. known-mislabelled ones).

    Args:
        ranking: ``(n,)`` scores; higher means inspect first. Ties are broken by index (lower first).
        flagged: ``(n,)`` bool, True for the examples to find (0/1 numbers are accepted).

    Returns:
        :class:`DetectionCurve`.

    Raises:
        ValueError: naming the argument, for a length mismatch, an empty ranking, non-finite rankings, or when
            no example is flagged.
    """
    r = _as_float("ranking", ranking, (1,), "(n,)")
    n = r.shape[0]
    if n == 0:
        raise bad_value("ranking", ranking, "it must rank at least one example", "pass a non-empty ranking")
    f = _as_bool("flagged", flagged, 1, "(n,)")
    if f.shape[0] != n:
        raise bad_value(
            "flagged",
            flagged,
            f"it needs one entry per ranked example (n={n}), got {f.shape[0]}",
            f"pass a bool array of length {n}",
        )
    n_flagged = int(f.sum())
    if n_flagged == 0:
        raise bad_value(
            "flagged",
            flagged,
            "at least one example must be flagged, or the fraction found is undefined",
            "flag the examples to be found (e.g. the known-mislabelled ones)",
        )
    order = np.argsort(-r, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(f[order], dtype=np.float64)]) / n_flagged
    inspected = np.arange(n + 1, dtype=np.float64) / n
    auc = np.float64(np.sum((found[1:] + found[:-1]) * 0.5) / n)
    return DetectionCurve(
        fraction_inspected=_freeze(inspected),
        fraction_found=_freeze(found),
        auc=auc,
        order=_freeze(order.astype(np.int64)),
        n=int(n),
        n_flagged=n_flagged,
    )
