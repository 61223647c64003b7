"""Tests for datatrace.verification.metrics: correlations, LOO correlation, LDS with noise ceiling, detection curves."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from scipy import stats

from datatrace.verification.metrics import (
    DetectionCurve,
    LDSResult,
    LOOCorrelation,
    calibration_slope,
    detection_curve,
    lds,
    loo_correlation,
    pearson,
    spearman,
)

# ----------------------------------------------------------------------------------------------------------------
# pearson / spearman
# ----------------------------------------------------------------------------------------------------------------


def test_row_correlations_match_scipy_on_random_data():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 30))
    b = 0.5 * a + rng.normal(size=(7, 30))
    b[3, :10] = b[3, 0]  # ties in one row
    p = pearson(a, b)
    s = spearman(a, b)
    assert p.shape == (7,) and s.shape == (7,)
    assert p.dtype == np.float64 and s.dtype == np.float64
    for q in range(7):
        assert p[q] == pytest.approx(stats.pearsonr(a[q], b[q])[0], abs=1e-12)
        assert s[q] == pytest.approx(stats.spearmanr(a[q], b[q])[0], abs=1e-12)


def test_row_correlations_accept_torch_and_1d():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=20), rng.normal(size=20)
    r = pearson(torch.tensor(a, dtype=torch.float64), torch.tensor(b))
    assert isinstance(r, np.float64)
    assert r == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert spearman(a.tolist(), b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)


def test_row_correlations_perfect_reversed_and_constant():
    x = np.arange(10.0)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone but not linear
    assert pearson(x, np.exp(x)) < 0.99
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert np.isnan(pearson(x, np.full(10, 0.1)))
    assert np.isnan(spearman(np.full(10, 2.0), x))


def test_pearson_is_stable_for_large_offsets():
    rng = np.random.default_rng(2)
    a = 1e12 + rng.normal(size=50)
    b = a + 0.1 * rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a - 1e12, b - 1e12)[0], abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# loo_correlation
# ----------------------------------------------------------------------------------------------------------------


def test_loo_correlation_matches_scipy():
    rng = np.random.default_rng(3)
    actual = rng.normal(size=(5, 40))
    estimated = actual + 0.7 * rng.normal(size=(5, 40))
    res = loo_correlation(torch.tensor(estimated), actual)
    assert isinstance(res, LOOCorrelation)
    assert res.n_query == 5
    expected_p = [stats.pearsonr(estimated[q], actual[q])[0] for q in range(5)]
    expected_s = [stats.spearmanr(estimated[q], actual[q])[0] for q in range(5)]
    np.testing.assert_allclose(res.pearson, expected_p, atol=1e-12)
    np.testing.assert_allclose(res.spearman, expected_s, atol=1e-12)
    assert res.mean_pearson == pytest.approx(np.mean(expected_p))
    assert res.mean_spearman == pytest.approx(np.mean(expected_s))
    assert res.pooled_pearson == pytest.approx(stats.pearsonr(estimated.ravel(), actual.ravel())[0])


def test_loo_correlation_perfect_and_reversed():
    actual = np.arange(12.0).reshape(2, 6) ** 2
    good = loo_correlation(actual * 3.0, actual)
    np.testing.assert_allclose(good.pearson, 1.0)
    np.testing.assert_allclose(good.spearman, 1.0)
    bad = loo_correlation(-actual, actual)
    np.testing.assert_allclose(bad.pearson, -1.0)
    np.testing.assert_allclose(bad.spearman, -1.0)
    assert bad.mean_spearman == pytest.approx(-1.0)
    assert bad.pooled_pearson == pytest.approx(-1.0)


def test_loo_correlation_one_dimensional_is_one_query():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=15), rng.normal(size=15)
    res = loo_correlation(a, b)
    assert res.n_query == 1 and res.pearson.shape == (1,)
    assert res.mean_pearson == pytest.approx(stats.pearsonr(a, b)[0])


def test_loo_correlation_constant_rows_are_nan_and_excluded(caplog):
    rng = np.random.default_rng(5)
    actual = rng.normal(size=(4, 20))
    estimated = actual + 0.3 * rng.normal(size=(4, 20))
    estimated[1] = 0.25  # constant estimate
    actual[2] = -1.0  # constant ground truth
    with caplog.at_level(logging.WARNING, logger="datatrace.verification.metrics"):
        res = loo_correlation(estimated, actual)
    assert np.isnan(res.pearson[[1, 2]]).all() and np.isnan(res.spearman[[1, 2]]).all()
    assert np.isfinite(res.pearson[[0, 3]]).all()
    assert res.mean_pearson == pytest.approx(res.pearson[[0, 3]].mean())
    assert res.mean_spearman == pytest.approx(res.spearman[[0, 3]].mean())
    assert np.isfinite(res.pooled_pearson)
    assert any("2 of 4" in rec.getMessage() for rec in caplog.records)


def test_loo_correlation_results_are_frozen():
    res = loo_correlation(np.arange(5.0), np.arange(5.0) ** 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.mean_pearson = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        res.pearson[0] = 0.0


@pytest.mark.parametrize(
    ("estimated", "actual", "name"),
    [
        (np.zeros((2, 5)), np.zeros((2, 6)), "actual"),
        (np.zeros((2, 5)), np.zeros((3, 5)), "actual"),
        (np.zeros((2, 5, 1)), np.zeros((2, 5, 1)), "estimated"),
        (np.zeros((2, 1)), np.zeros((2, 1)), "estimated"),
        (np.array([1.0, np.nan, 2.0]), np.zeros(3), "estimated"),
        (np.zeros(3), np.array([1.0, np.inf, 2.0]), "actual"),
        (np.array(["a", "b"]), np.zeros(2), "estimated"),
    ],
)
def test_loo_correlation_bad_input_names_argument(estimated, actual, name):
    with pytest.raises(ValueError, match=name) as info:
        loo_correlation(estimated, actual)
    assert "Fix:" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# lds
# ----------------------------------------------------------------------------------------------------------------


def _additive_problem(seed=0, n_query=3, n_train=25, m=40, n_seeds=1, noise=0.0):
    """Outputs from a known additive datamodel: output_q(S) = c_q + sum_{i in S} theta[q, i] (+ seed noise)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(n_query, n_train))
    c = rng.normal(size=n_query)
    masks = rng.random((m, n_train)) < 0.5
    clean = masks.astype(float) @ theta.T + c  # (m, n_query)
    outputs = clean[:, None, :] + noise * rng.normal(size=(m, n_seeds, n_query))
    return theta, masks, clean, outputs


def test_lds_additive_datamodel_sign_convention():
    theta, masks, clean, _ = _additive_problem()
    # Removing example i changes the output by -theta[q, i]; in the library's convention that *is* the score.
    scores = -theta
    res = lds(scores, masks, clean)
    assert isinstance(res, LDSResult)
    np.testing.assert_allclose(res.per_query, 1.0)
    assert res.mean == pytest.approx(1.0)
    flipped = lds(theta, masks, clean)
    np.testing.assert_allclose(flipped.per_query, -1.0)
    assert flipped.mean == pytest.approx(-1.0)
    assert res.n_seeds == 1 and res.noise_ceiling is None and res.noise_ceiling_per_query is None
    assert res.split_half_per_query is None and res.correlation_ceiling is None


def test_lds_positive_score_means_removal_raises_output():
    # One example that matters: keeping it lowers the output, so removing it raises it -> positive score.
    masks = np.array([[True, True], [False, True], [True, False], [False, False]])
    outputs = np.array([[0.0], [1.0], [0.0], [1.0]])  # output rises exactly when example 0 is removed
    res = lds(np.array([[1.0, 0.0]]), masks, outputs)
    assert res.mean == pytest.approx(1.0)
    np.testing.assert_allclose(res.predicted[:, 0], [0.0, 1.0, 0.0, 1.0])


def test_lds_matches_scipy_and_averages_seeds():
    theta, masks, _, outputs = _additive_problem(seed=1, n_seeds=4, noise=2.0)
    rng = np.random.default_rng(9)
    scores = -theta + 0.5 * rng.normal(size=theta.shape)
    res = lds(torch.tensor(scores), torch.tensor(masks), torch.tensor(outputs))
    predicted = (~masks).astype(float) @ scores.T
    actual = outputs.mean(axis=1)
    np.testing.assert_allclose(res.predicted, predicted)
    np.testing.assert_allclose(res.actual, actual)
    expected = [stats.spearmanr(predicted[:, q], actual[:, q])[0] for q in range(3)]
    np.testing.assert_allclose(res.per_query, expected, atol=1e-12)
    assert res.mean == pytest.approx(np.mean(expected))
    assert res.n_seeds == 4


def test_lds_noise_ceiling_identical_seeds_is_one():
    theta, masks, clean, _ = _additive_problem(seed=2)
    outputs = np.repeat(clean[:, None, :], 4, axis=1)
    res = lds(-theta, masks, outputs)
    np.testing.assert_allclose(res.split_half_per_query, 1.0)
    np.testing.assert_allclose(res.noise_ceiling_per_query, 1.0)
    assert res.noise_ceiling == pytest.approx(1.0)
    assert res.correlation_ceiling == pytest.approx(1.0)


def test_lds_noise_ceiling_drops_with_noise_and_follows_spearman_brown():
    theta, masks, _, outputs = _additive_problem(seed=3, n_query=4, m=200, n_seeds=6, noise=3.0)
    res = lds(-theta, masks, outputs)
    first, second = outputs[:, :3].mean(axis=1), outputs[:, 3:].mean(axis=1)
    r = np.array([stats.spearmanr(first[:, q], second[:, q])[0] for q in range(4)])
    np.testing.assert_allclose(res.split_half_per_query, r, atol=1e-12)
    np.testing.assert_allclose(res.noise_ceiling_per_query, 2 * r / (1 + r), atol=1e-12)
    assert 0.0 < res.noise_ceiling < 0.95
    assert res.correlation_ceiling == pytest.approx(np.sqrt(res.noise_ceiling))
    _, _, _, quiet_outputs = _additive_problem(seed=3, n_query=4, m=200, n_seeds=6, noise=0.5)
    quieter = lds(-theta, masks, quiet_outputs)
    assert res.noise_ceiling < quieter.noise_ceiling < 1.0
    assert quieter.mean > res.mean
    # the true datamodel cannot beat the noise by much: its LDS is near sqrt(reliability), below 1
    assert res.mean < 0.99
    assert abs(res.mean - res.correlation_ceiling) < 0.15


def test_lds_odd_seeds_split_first_half_smaller():
    theta, masks, _, outputs = _additive_problem(seed=4, n_seeds=3, noise=1.0)
    res = lds(-theta, masks, outputs)
    first, second = outputs[:, :1].mean(axis=1), outputs[:, 1:].mean(axis=1)
    r = [stats.spearmanr(first[:, q], second[:, q])[0] for q in range(3)]
    np.testing.assert_allclose(res.split_half_per_query, r, atol=1e-12)


def test_lds_constant_query_is_nan_and_excluded(caplog):
    theta, masks, clean, _ = _additive_problem(seed=5)
    clean = clean.copy()
    clean[:, 1] = 7.0  # query 1's actual output never changes
    with caplog.at_level(logging.WARNING, logger="datatrace.verification.metrics"):
        res = lds(-theta, masks, clean)
    assert np.isnan(res.per_query[1])
    assert res.mean == pytest.approx(1.0)
    assert any("1 of 3" in rec.getMessage() for rec in caplog.records)


def test_lds_one_query_1d_inputs():
    theta, masks, clean, _ = _additive_problem(seed=6, n_query=1)
    res = lds(-theta[0], masks, clean[:, 0])
    assert res.per_query.shape == (1,)
    assert res.mean == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("scores", "masks", "outputs", "name"),
    [
        (np.zeros((2, 5)), np.ones((4, 6), bool), np.zeros((4, 2)), "masks"),
        (np.zeros((2, 5)), np.ones(5, bool), np.zeros((4, 2)), "masks"),
        (np.zeros((2, 5)), np.ones((1, 5), bool), np.zeros((1, 2)), "masks"),
        (np.zeros((2, 5)), np.full((4, 5), 2), np.zeros((4, 2)), "masks"),
        (np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros((3, 2)), "outputs"),
        (np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros((4, 3)), "outputs"),
        (np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros((4, 2, 3)), "outputs"),
        (np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros(4), "outputs"),
        (np.zeros((2, 5)), np.ones((4, 5), bool), np.zeros((4, 0, 2)), "outputs"),
        (np.zeros((2, 5, 1)), np.ones((4, 5), bool), np.zeros((4, 2)), "scores"),
        (np.full((2, 5), np.nan), np.ones((4, 5), bool), np.zeros((4, 2)), "scores"),
        (np.zeros((0, 5)), np.ones((4, 5), bool), np.zeros((4, 0)), "scores"),
    ],
)
def test_lds_bad_input_names_argument(scores, masks, outputs, name):
    with pytest.raises(ValueError, match=name) as info:
        lds(scores, masks, outputs)
    assert "Fix:" in str(info.value)


def test_lds_accepts_zero_one_masks():
    theta, masks, clean, _ = _additive_problem(seed=7)
    res = lds(-theta, masks.astype(np.int64), clean)
    assert res.mean == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# detection_curve
# ----------------------------------------------------------------------------------------------------------------


def test_detection_curve_perfect_ranking():
    n, k = 20, 5
    flagged = np.zeros(n, bool)
    flagged[[3, 8, 11, 15, 19]] = True
    ranking = flagged.astype(float) + 0.01 * np.arange(n)  # flagged first
    curve = detection_curve(ranking, flagged)
    assert isinstance(curve, DetectionCurve)
    assert curve.fraction_inspected.shape == (n + 1,) and curve.fraction_found.shape == (n + 1,)
    assert curve.fraction_inspected[0] == 0.0 and curve.fraction_found[0] == 0.0
    assert curve.fraction_inspected[-1] == 1.0 and curve.fraction_found[-1] == 1.0
    for j in range(n + 1):
        assert curve.found_at(j / n) == pytest.approx(min(1.0, j / k))
        assert curve.random_found_at(j / n) == pytest.approx(j / n)
    assert curve.found_at(0.01) == pytest.approx(1 / k)  # ceil(0.2) = 1 example inspected
    assert curve.auc == pytest.approx(1 - k / (2 * n))
    assert curve.n == n and curve.n_flagged == k


def test_detection_curve_worst_ranking_and_auc_bounds():
    flagged = np.array([True, False, False, False])
    worst = detection_curve(np.array([0.0, 1.0, 2.0, 3.0]), flagged)
    assert worst.found_at(0.75) == 0.0 and worst.found_at(1.0) == 1.0
    assert worst.auc == pytest.approx(1 / 8)
    best = detection_curve(np.array([3.0, 2.0, 1.0, 0.0]), flagged)
    assert best.auc == pytest.approx(7 / 8)
    assert 0.0 <= worst.auc < 0.5 < best.auc <= 1.0


def test_detection_curve_random_ranking_auc_near_half():
    rng = np.random.default_rng(123)
    n = 20000
    flagged = rng.random(n) < 0.1
    curve = detection_curve(rng.normal(size=n), flagged)
    assert curve.auc == pytest.approx(0.5, abs=0.02)
    assert curve.found_at(0.3) == pytest.approx(0.3, abs=0.03)


def test_detection_curve_ties_broken_by_index():
    flagged = np.array([False, True, False, True])
    curve = detection_curve(torch.zeros(4), torch.tensor([0, 1, 0, 1]))
    np.testing.assert_array_equal(curve.order, [0, 1, 2, 3])
    np.testing.assert_allclose(curve.fraction_found, [0.0, 0.0, 0.5, 0.5, 1.0])
    tied = detection_curve(np.array([1.0, 5.0, 5.0, 1.0]), flagged)
    np.testing.assert_array_equal(tied.order, [1, 2, 0, 3])


@pytest.mark.parametrize(
    ("ranking", "flagged", "name"),
    [
        (np.zeros(5), np.zeros(5, bool), "flagged"),
        (np.zeros(5), np.ones(4, bool), "flagged"),
        (np.zeros(5), np.full(5, 3), "flagged"),
        (np.zeros((5, 1)), np.ones(5, bool), "ranking"),
        (np.zeros(0), np.zeros(0, bool), "ranking"),
        (np.array([0.0, np.nan]), np.ones(2, bool), "ranking"),
    ],
)
def test_detection_curve_bad_input_names_argument(ranking, flagged, name):
    with pytest.raises(ValueError, match=name) as info:
        detection_curve(ranking, flagged)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, "half", float("nan")])
def test_found_at_bad_fraction_names_argument(fraction):
    curve = detection_curve(np.arange(4.0), np.array([True, False, False, True]))
    with pytest.raises(ValueError, match="fraction"):
        curve.found_at(fraction)
    with pytest.raises(ValueError, match="fraction"):
        curve.random_found_at(fraction)


def test_correlation_helpers_bad_input_names_argument():
    with pytest.raises(ValueError, match="b="):
        pearson(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="a="):
        spearman(np.zeros(1), np.zeros(1))


def test_metrics_take_a_scores_object_as_its_values():
    """lds / loo_correlation accept the Scores an attributor returns, equal to passing scores.values."""
    from datatrace import Scores

    rng = np.random.default_rng(3)
    values = torch.as_tensor(rng.normal(size=(3, 8)))
    scores = Scores(values, "the query's loss")
    masks = rng.integers(0, 2, size=(12, 8)).astype(bool)
    outputs = rng.normal(size=(12, 3))
    assert lds(scores, masks, outputs).mean == lds(values, masks, outputs).mean
    actual = rng.normal(size=(3, 8))
    assert loo_correlation(scores, actual).mean_pearson == loo_correlation(values, actual).mean_pearson


def test_calibration_slope_is_the_centred_least_squares_slope():
    rng = np.random.default_rng(0)
    estimated = rng.normal(size=(4, 30))
    shifts = rng.normal(size=(4, 1))
    # a per-row constant drops out; the slope is recovered exactly
    assert calibration_slope(estimated, 2.5 * estimated + shifts) == pytest.approx(2.5, rel=1e-12)
    noisy = 0.5 * estimated + rng.normal(scale=0.1, size=estimated.shape)
    e = estimated - estimated.mean(axis=1, keepdims=True)
    a = noisy - noisy.mean(axis=1, keepdims=True)
    expected = np.polyfit(e.ravel(), a.ravel(), 1)[0]  # pooled least squares through the centred points
    assert calibration_slope(torch.as_tensor(estimated), noisy) == pytest.approx(expected, rel=1e-10)
    assert calibration_slope(estimated[0], -estimated[0]) == pytest.approx(-1.0)
    assert np.isnan(calibration_slope(np.ones((2, 5)), estimated[:2, :5]))
    with pytest.raises(ValueError, match="actual"):
        calibration_slope(estimated, estimated[:, :5])
