"""Closed-form regression diagnostics checked against sklearn fits and brute-force leave-one-out refits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, Ridge

from datatrace.verification.diagnostics import RegressionDiagnostics, linear_regression_diagnostics

RTOL = 1e-7
ATOL = 1e-9


def _data(n: int = 25, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * np.arange(1, d + 1) + 0.7  # uneven scales, non-zero means
    y = X @ rng.normal(size=d) + 1.5 + 0.3 * rng.standard_t(df=3, size=n)
    return X, y


def _design(X: np.ndarray, fit_intercept: bool) -> np.ndarray:
    return np.column_stack([X, np.ones(len(X))]) if fit_intercept else X


def _fit(X: np.ndarray, y: np.ndarray, fit_intercept: bool, alpha: float) -> np.ndarray:
    """theta = (coef, intercept) from sklearn: an implementation independent of the one under test."""
    if alpha == 0.0:
        model = LinearRegression(fit_intercept=fit_intercept).fit(X, y)
    else:
        model = Ridge(alpha=alpha, fit_intercept=fit_intercept, solver="svd").fit(X, y)
    coef = np.asarray(model.coef_, dtype=float)
    return np.append(coef, model.intercept_) if fit_intercept else coef


def _brute_force_loo(
    X: np.ndarray, y: np.ndarray, fit_intercept: bool, alpha: float
) -> dict[str, np.ndarray]:
    """Refit n times, leaving one row out each time, and compute the diagnostics from their definitions."""
    n, d = X.shape
    Z = _design(X, fit_intercept)
    p = Z.shape[1]
    theta = _fit(X, y, fit_intercept, alpha)
    resid = y - Z @ theta
    penalty = alpha * np.diag(np.r_[np.ones(d), np.zeros(p - d)])
    H = Z @ np.linalg.solve(Z.T @ Z + penalty, Z.T)
    h = np.diag(H)
    dof = np.trace(H)
    s2 = resid @ resid / (n - dof)

    thetas, s_loo = [], []
    for i in range(n):
        keep = np.arange(n) != i
        theta_i = _fit(X[keep], y[keep], fit_intercept, alpha)
        Zi = Z[keep]
        H_i = Zi @ np.linalg.solve(Zi.T @ Zi + penalty, Zi.T)
        r_i = y[keep] - Zi @ theta_i
        s_loo.append(np.sqrt(r_i @ r_i / (n - 1 - np.trace(H_i))))
        thetas.append(theta_i)
    thetas = np.array(thetas)
    s_loo = np.array(s_loo)

    change = thetas - theta
    fitted_change = change @ Z.T  # row i: Z theta_(i) - Z theta
    own_change = np.einsum("ij,ij->i", Z, change)
    C = np.linalg.inv(Z.T @ Z) if alpha == 0.0 else None
    out = {
        "theta": theta,
        "leverage": h,
        "dof": dof,
        "sigma2": s2,
        "loo_sigma": s_loo,
        "loo_coef_change": change,
        "cooks_distance": (fitted_change**2).sum(axis=1) / (p * s2),
        "external_studentized_residuals": resid / (s_loo * np.sqrt(1 - h)),
        "dffits": -own_change / (s_loo * np.sqrt(h)),
    }
    if C is not None:
        out["dfbetas"] = -change / (s_loo[:, None] * np.sqrt(np.diag(C))[None, :])
        # The leave-one-out prediction error form of the external studentized residual (OLS identity).
        loo_pred_err = y - np.einsum("ij,ij->i", Z, thetas)
        out["external_from_prediction"] = loo_pred_err * np.sqrt(1 - h) / s_loo
    return out


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 20.0])
def test_coefficients_match_sklearn(fit_intercept: bool, alpha: float) -> None:
    X, y = _data()
    diag = linear_regression_diagnostics(X, y, fit_intercept=fit_intercept, alpha=alpha)
    assert isinstance(diag, RegressionDiagnostics)
    theta = _fit(X, y, fit_intercept, alpha)
    np.testing.assert_allclose(diag.coef, theta[:3], rtol=RTOL, atol=ATOL)
    assert diag.intercept == pytest.approx(theta[3] if fit_intercept else 0.0, abs=1e-9)
    np.testing.assert_allclose(diag.params, theta, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(diag.fitted, _design(X, fit_intercept) @ theta, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(diag.residuals, y - diag.fitted, rtol=RTOL, atol=ATOL)
    assert diag.dfbetas.shape == diag.loo_coef_change.shape == (len(y), 3 + int(fit_intercept))


def test_ridge_with_more_features_than_examples_matches_sklearn() -> None:
    X, y = _data(n=12, d=30, seed=3)
    for fit_intercept in (True, False):
        diag = linear_regression_diagnostics(X, y, fit_intercept=fit_intercept, alpha=2.0)
        np.testing.assert_allclose(diag.params, _fit(X, y, fit_intercept, 2.0), rtol=1e-7, atol=1e-9)
        assert np.all(diag.leverage < 1.0) and diag.dof < len(y)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_leverage_is_hat_matrix_diagonal(fit_intercept: bool, alpha: float) -> None:
    X, y = _data(n=20, d=4, seed=1)
    diag = linear_regression_diagnostics(X, y, fit_intercept=fit_intercept, alpha=alpha)
    Z = _design(X, fit_intercept)
    d = X.shape[1]
    penalty = alpha * np.diag(np.r_[np.ones(d), np.zeros(Z.shape[1] - d)])  # unpenalised intercept column
    H = Z @ np.linalg.solve(Z.T @ Z + penalty, Z.T)
    np.testing.assert_allclose(diag.leverage, np.diag(H), rtol=1e-9, atol=1e-12)
    assert diag.dof == pytest.approx(np.trace(H), rel=1e-10)
    assert diag.sigma2 == pytest.approx(diag.residuals @ diag.residuals / (len(y) - np.trace(H)), rel=1e-10)
    np.testing.assert_allclose(H @ y, diag.fitted, rtol=1e-8, atol=1e-10)
    if alpha == 0.0:
        assert diag.dof == pytest.approx(Z.shape[1], rel=1e-12)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ols_deletion_diagnostics_match_brute_force_refits(fit_intercept: bool) -> None:
    X, y = _data(n=18, d=3, seed=2)
    y[4] += 4.0
    diag = linear_regression_diagnostics(X, y, fit_intercept=fit_intercept)
    ref = _brute_force_loo(X, y, fit_intercept, 0.0)
    for name in (
        "loo_coef_change",
        "loo_sigma",
        "cooks_distance",
        "external_studentized_residuals",
        "dffits",
        "dfbetas",
    ):
        np.testing.assert_allclose(getattr(diag, name), ref[name], rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(
        diag.external_studentized_residuals, ref["external_from_prediction"], rtol=1e-6, atol=1e-9
    )
    # Textbook closed forms (Cook 1977; Belsley, Kuh & Welsch 1980) hold exactly for OLS.
    h, r, p, s2 = diag.leverage, diag.residuals, ref["theta"].size, diag.sigma2
    np.testing.assert_allclose(diag.cooks_distance, r**2 * h / (p * s2 * (1 - h) ** 2), rtol=1e-9)
    np.testing.assert_allclose(diag.studentized_residuals, r / np.sqrt(s2 * (1 - h)), rtol=1e-9)
    n = len(y)
    np.testing.assert_allclose(
        diag.loo_sigma**2, ((n - p) * s2 - r**2 / (1 - h)) / (n - p - 1), rtol=1e-9, atol=1e-12
    )
    t = diag.external_studentized_residuals
    np.testing.assert_allclose(diag.dffits, t * np.sqrt(h / (1 - h)), rtol=1e-9)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_deletion_diagnostics_match_brute_force_refits(fit_intercept: bool) -> None:
    X, y = _data(n=16, d=5, seed=4)
    y[2] -= 5.0
    alpha = 4.0
    diag = linear_regression_diagnostics(X, y, fit_intercept=fit_intercept, alpha=alpha)
    ref = _brute_force_loo(X, y, fit_intercept, alpha)
    for name in (
        "loo_coef_change",
        "cooks_distance",
        "loo_sigma",
        "external_studentized_residuals",
        "dffits",
    ):
        np.testing.assert_allclose(getattr(diag, name), ref[name], rtol=1e-6, atol=1e-9, err_msg=name)
    # s_(i)^2 is exactly the sigma2 this function reports on the data without row i.
    i = 2
    keep = np.arange(len(y)) != i
    again = linear_regression_diagnostics(X[keep], y[keep], fit_intercept=fit_intercept, alpha=alpha)
    assert diag.loo_sigma[i] ** 2 == pytest.approx(again.sigma2, rel=1e-9)


def test_ridge_dfbetas_use_ridge_coefficient_covariance() -> None:
    X, y = _data(n=15, d=3, seed=5)
    alpha = 2.5
    diag = linear_regression_diagnostics(X, y, alpha=alpha)
    ref = _brute_force_loo(X, y, True, alpha)
    Z = _design(X, True)
    A_inv = np.linalg.inv(Z.T @ Z + alpha * np.diag([1.0, 1.0, 1.0, 0.0]))
    C = A_inv @ Z.T @ Z @ A_inv
    expected = -ref["loo_coef_change"] / (ref["loo_sigma"][:, None] * np.sqrt(np.diag(C))[None, :])
    np.testing.assert_allclose(diag.dfbetas, expected, rtol=1e-6, atol=1e-9)


def test_alpha_zero_is_the_limit_of_ridge() -> None:
    X, y = _data(n=20, d=3, seed=6)
    ols = linear_regression_diagnostics(X, y)
    tiny = linear_regression_diagnostics(X, y, alpha=1e-9)
    for name in ("coef", "leverage", "cooks_distance", "dfbetas", "external_studentized_residuals"):
        np.testing.assert_allclose(
            getattr(tiny, name), getattr(ols, name), rtol=1e-5, atol=1e-8, err_msg=name
        )


def test_planted_outlier_at_high_leverage_has_largest_cooks_distance() -> None:
    rng = np.random.default_rng(7)
    n = 60
    X = rng.normal(size=(n, 2))
    y = X @ np.array([2.0, -1.0]) + 0.2 * rng.normal(size=n)
    X[17] = [6.0, 5.0]  # far from the cloud: high leverage
    y[17] = -10.0  # and far off the regression plane
    diag = linear_regression_diagnostics(X, y)
    assert int(np.argmax(diag.leverage)) == 17
    assert int(np.argmax(diag.cooks_distance)) == 17
    assert int(np.argmax(np.abs(diag.dffits))) == 17
    assert int(np.argmax(np.abs(diag.external_studentized_residuals))) == 17
    flagged = diag.influential()
    assert flagged[0] == 17
    assert np.all(diag.cooks_distance[flagged] > 4 / n)
    assert np.all(np.diff(diag.cooks_distance[flagged]) <= 0)  # most influential first
    assert diag.influential(cooks_threshold=1e9).size == 0
    ridge = linear_regression_diagnostics(X, y, alpha=5.0)
    assert int(np.argmax(ridge.cooks_distance)) == 17


def test_torch_and_list_inputs_give_the_same_result() -> None:
    X, y = _data(n=14, d=2, seed=8)
    ref = linear_regression_diagnostics(X, y, alpha=1.0)
    for Xin, yin in (
        (torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)),
        (X.tolist(), y.tolist()),
    ):
        out = linear_regression_diagnostics(Xin, yin, alpha=1.0)
        np.testing.assert_allclose(out.cooks_distance, ref.cooks_distance, rtol=1e-12)
        np.testing.assert_allclose(out.dfbetas, ref.dfbetas, rtol=1e-12)
    # float32 tensors are promoted to float64 before any arithmetic.
    out32 = linear_regression_diagnostics(torch.tensor(X, dtype=torch.float32), torch.tensor(y), alpha=1.0)
    assert out32.coef.dtype == np.float64


def test_result_is_frozen_and_read_only() -> None:
    X, y = _data(n=10, d=2)
    diag = linear_regression_diagnostics(X, y)
    with pytest.raises(AttributeError):
        diag.sigma2 = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        diag.cooks_distance[0] = 1.0


def test_leverage_one_row_gives_nan_deletion_diagnostics_with_warning() -> None:
    X, y = _data(n=12, d=2, seed=9)
    X = np.column_stack([X, np.zeros(12)])
    X[5, 2] = 1.0  # a dummy feature seen by one row only: h_55 = 1
    with pytest.warns(RuntimeWarning, match="leverage 1"):
        diag = linear_regression_diagnostics(X, y)
    assert diag.leverage[5] == pytest.approx(1.0)
    assert np.isnan(diag.cooks_distance[5]) and np.all(np.isnan(diag.loo_coef_change[5]))
    assert np.all(np.isfinite(np.delete(diag.cooks_distance, 5)))
    assert 5 not in diag.influential(0.0)


@pytest.mark.parametrize(
    ("kwargs", "name", "fragment"),
    [
        ({"X": np.ones(5)}, "X=", "2-D"),
        ({"y": np.ones((20, 1))}, "y=", "y.ravel()"),
        ({"y": np.ones(19)}, "y=", "same number"),
        ({"alpha": -1.0}, "alpha=", ">= 0"),
        ({"alpha": float("nan")}, "alpha=", "non-negative"),
        ({"fit_intercept": "yes"}, "fit_intercept=", "True or False"),
        ({"X": np.array([["a", "b"]] * 20)}, "X=", "numeric"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs: dict, name: str, fragment: str) -> None:
    X, y = _data(n=20, d=2)
    args = {"X": X, "y": y, **kwargs}
    with pytest.raises(ValueError, match="Fix:") as info:
        linear_regression_diagnostics(**args)
    assert name in str(info.value) and fragment in str(info.value)


def test_non_finite_values_are_located() -> None:
    X, y = _data(n=20, d=3)
    X[6, 2] = np.nan
    with pytest.raises(ValueError, match=r"X=.*row 6, column 2.*nan.*Fix:"):
        linear_regression_diagnostics(X, y)
    X, y = _data(n=20, d=3)
    y[11] = np.inf
    with pytest.raises(ValueError, match=r"y=.*row 11.*inf"):
        linear_regression_diagnostics(X, y)


def test_ols_with_too_few_examples_suggests_ridge() -> None:
    X, y = _data(n=4, d=3)
    with pytest.raises(ValueError, match=r"X=.*n=4 <= p=4.*alpha > 0"):
        linear_regression_diagnostics(X, y)
    linear_regression_diagnostics(X, y, alpha=1.0)  # ridge is fine
    linear_regression_diagnostics(X, y, fit_intercept=False)  # n=4 > p=3


def test_rank_deficient_ols_names_the_columns() -> None:
    X, y = _data(n=20, d=3)
    X = np.column_stack([X, X[:, 0] - 2 * X[:, 2]])  # column 3 = col 0 - 2 col 2
    with pytest.raises(ValueError, match=r"X=.*rank 3 < 4.*\[0, 2, 3\].*alpha > 0"):
        linear_regression_diagnostics(X, y)
    X2, y2 = _data(n=20, d=2)
    X2[:, 1] = 3.0  # constant column: collinear with the intercept only
    with pytest.raises(ValueError, match=r"X=.*\[1\].*intercept"):
        linear_regression_diagnostics(X2, y2)
    linear_regression_diagnostics(X2, y2, fit_intercept=False)  # fine without an intercept
    diag = linear_regression_diagnostics(X, y, alpha=0.1)  # and ridge handles collinearity
    assert np.all(np.isfinite(diag.cooks_distance))


def test_influential_rejects_bad_threshold() -> None:
    X, y = _data(n=10, d=2)
    diag = linear_regression_diagnostics(X, y)
    with pytest.raises(ValueError, match="cooks_threshold="):
        diag.influential(cooks_threshold=-0.1)


def test_exact_fit_warns() -> None:
    X, _ = _data(n=10, d=2)
    with pytest.warns(RuntimeWarning, match="fits y exactly"):
        linear_regression_diagnostics(X, X @ np.array([1.0, 2.0]) + 3.0)


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_sparse_design_matrix_equals_dense(alpha):
    """A scipy sparse X (a TF-IDF matrix, say) gives the dense answer, not a 'dtype object' refusal."""
    sparse = pytest.importorskip("scipy.sparse")
    X, y = _data()
    X[X < 0] = 0.0  # mostly zeros, as sparse data is
    dense = linear_regression_diagnostics(X, y, alpha=alpha)
    from_sparse = linear_regression_diagnostics(sparse.csr_matrix(X), y, alpha=alpha)
    np.testing.assert_allclose(from_sparse.cooks_distance, dense.cooks_distance, rtol=1e-12)
    np.testing.assert_allclose(from_sparse.leverage, dense.leverage, rtol=1e-12)
