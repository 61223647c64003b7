"""Closed-form regression influence diagnostics for ordinary least squares and ridge regression.

:func:`linear_regression_diagnostics` fits a linear model and returns, for every training example, the classical
deletion diagnostics: leverage, (internally and externally) studentized residuals, Cook's distance, DFFITS,
DFBETAS and the exact change of the coefficients when that example is left out. Nothing is refitted: every
leave-one-out quantity comes from the Sherman-Morrison identity and is exact (up to rounding), which makes these
numbers a ground truth against which approximate influence methods can be checked.

Model and notation
------------------
``X`` is ``(n, d)`` and ``y`` is ``(n,)``. With ``fit_intercept=True`` the design is ``Z = [X, 1]`` and the
parameter vector is ``theta = (coef_0, ..., coef_{d-1}, intercept)``: **the intercept is the last column** of
``dfbetas`` and ``loo_coef_change``. Without an intercept ``Z = X`` and ``theta = coef``. ``p`` is the number of
fitted parameters (``d + 1`` or ``d``). The fit minimises the *sum* loss (the objective of
``sklearn.linear_model.Ridge``; ``alpha = 0`` is ordinary least squares)::

    ||y - Z theta||^2 + alpha * ||coef||^2        (the intercept is not penalised)

so ``theta = A^{-1} Z^T y`` with ``A = Z^T Z + P`` and ``P = alpha * diag(1, ..., 1, 0)`` (the trailing 0 only
with an intercept). The hat matrix is ``H = Z A^{-1} Z^T``, ``h_ii`` its diagonal, ``r = y - H y`` the residuals.

How the intercept is handled: exactly, as an unpenalised column. Numerically this is done by centring -- with
``Xc = X - mean(X)`` one has ``H = 1 1^T / n + Xc (Xc^T Xc + alpha I)^{-1} Xc^T``, an identity, not an
approximation -- and everything is computed from one thin SVD ``Xc = U S V^T``, so no normal-equation matrix is
ever inverted.

Deletion formulas (``u_i = A^{-1} z_i``, exact for OLS and for ridge because deleting row ``i`` from the sum
loss leaves ``alpha`` unchanged; ``A_(i) = A - z_i z_i^T``)::

    theta_(i) - theta       = -u_i r_i / (1 - h_ii)                       (loo_coef_change)
    y_i - z_i^T theta_(i)   =  r_i / (1 - h_ii)                           (leave-one-out prediction error)
    RSS_(i)                 =  RSS + alpha||coef||^2 - r_i^2/(1 - h_ii) - alpha||coef_(i)||^2
    dof                     =  trace(H)          = p - trace(A^{-1} P)
    dof_(i)                 =  trace(H_(i))      = dof - u_i^T P u_i / (1 - h_ii)
    s^2                     =  RSS / (n - dof)                             (sigma2)
    s_(i)^2                 =  RSS_(i) / (n - 1 - dof_(i))                 (loo_sigma ** 2)

``s_(i)^2`` is therefore *exactly* the ``sigma2`` this function would report on the data with row ``i`` removed.
For OLS (``alpha = 0``) it reduces to the textbook ``((n - p) s^2 - r_i^2 / (1 - h_ii)) / (n - p - 1)``.

Diagnostics::

    studentized_residuals_i           = r_i / (s sqrt(1 - h_ii))
    external_studentized_residuals_i  = r_i / (s_(i) sqrt(1 - h_ii))
    cooks_distance_i                  = ||Z theta - Z theta_(i)||^2 / (p s^2)
                                      = r_i^2 [H^2]_ii / (p s^2 (1 - h_ii)^2)
    dffits_i                          = (z_i^T theta - z_i^T theta_(i)) / (s_(i) sqrt(h_ii))
                                      = external_studentized_residuals_i * sqrt(h_ii / (1 - h_ii))
    dfbetas_ij                        = (theta_j - theta_(i)j) / (s_(i) sqrt(C_jj)),
                                        C = A^{-1} Z^T Z A^{-1}

For OLS ``[H^2]_ii = h_ii`` and ``C = (Z^T Z)^{-1}``, giving exactly Cook's ``r_i^2 h_ii / (p s^2 (1 - h_ii)^2)``
and the Belsley-Kuh-Welsch DFBETAS. For ridge, Cook's distance is the exact leave-one-out change of all fitted
values (Walker & Birch 1988, with ``p`` -- the number of fitted parameters -- in the denominator, not ``dof``),
and DFBETAS is scaled by the ridge coefficient covariance ``sigma^2 A^{-1} Z^T Z A^{-1}``. Note the signs:
``dfbetas`` follows Belsley, Kuh & Welsch (full fit minus deleted fit), whereas ``loo_coef_change`` is deleted
fit minus full fit. The studentized residuals use ``1 - h_ii`` for ridge too (the conventional form; the exact
residual variance under ridge would be ``sigma^2 [(I - H)^2]_ii``).

References
----------
* R. D. Cook (1977). Detection of influential observation in linear regression. *Technometrics* 19(1), 15-18.
* D. A. Belsley, E. Kuh & R. E. Welsch (1980). *Regression Diagnostics: Identifying Influential Data and Sources
  of Collinearity*. Wiley.
* E. Walker & J. B. Birch (1988). Influence measures in ridge regression. *Technometrics* 30(2), 221-227.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from datatrace.errors import bad_value, check_nonnegative_float

__all__ = ["RegressionDiagnostics", "linear_regression_diagnostics"]

# 1 - h_ii below this counts as h_ii = 1: deleting that row leaves the OLS model unidentifiable.
_LEVERAGE_ONE_TOL = 1e-10


@dataclass(frozen=True, eq=False)
class RegressionDiagnostics:
    """Influence diagnostics of a linear (OLS or ridge) fit; see :mod:`datatrace.verification.diagnostics` for the formulas.

    All arrays are float64 and read-only. Per-example arrays have length ``n``; per-parameter columns (in
    ``dfbetas`` and ``loo_coef_change``) are ``coef_0, ..., coef_{d-1}`` followed by the intercept when
    ``fit_intercept`` is true. Deletion quantities of a row whose removal makes the OLS problem unidentifiable
    (``h_ii = 1``), or that need a variance from fewer residual degrees of freedom than exist, are NaN.

    Attributes:
        coef: ``(d,)`` fitted coefficients.
        intercept: fitted intercept (0.0 without ``fit_intercept``).
        fitted: ``(n,)`` fitted values ``Z theta``.
        residuals: ``(n,)`` ``y - fitted``.
        leverage: ``(n,)`` hat-matrix diagonal ``h_ii`` (of the ridge smoother when ``alpha > 0``).
        dof: effective degrees of freedom, ``trace(H)`` (equals ``p`` for OLS).
        sigma2: residual variance ``RSS / (n - dof)``.
        loo_sigma: ``(n,)`` ``s_(i)``, the residual standard deviation of the fit without row ``i`` (exact).
        studentized_residuals: ``(n,)`` internally studentized residuals ``r_i / (s sqrt(1 - h_ii))``.
        external_studentized_residuals: ``(n,)`` ``r_i / (s_(i) sqrt(1 - h_ii))``.
        cooks_distance: ``(n,)`` ``||Z theta - Z theta_(i)||^2 / (p s^2)``.
        dffits: ``(n,)`` ``(z_i^T theta - z_i^T theta_(i)) / (s_(i) sqrt(h_ii))``.
        dfbetas: ``(n, p)`` ``(theta_j - theta_(i)j) / (s_(i) sqrt(C_jj))``.
        loo_coef_change: ``(n, p)`` exact ``theta_(i) - theta``.
        fit_intercept: whether an (unpenalised) intercept was fitted.
        alpha: the ridge penalty (0.0 for OLS).
    """

    coef: np.ndarray
    intercept: float
    fitted: np.ndarray
    residuals: np.ndarray
    leverage: np.ndarray
    dof: float
    sigma2: float
    loo_sigma: np.ndarray
    studentized_residuals: np.ndarray
    external_studentized_residuals: np.ndarray
    cooks_distance: np.ndarray
    dffits: np.ndarray
    dfbetas: np.ndarray
    loo_coef_change: np.ndarray
    fit_intercept: bool
    alpha: float

    @property
    def n_samples(self) -> int:
        return int(self.residuals.shape[0])

    @property
    def params(self) -> np.ndarray:
        """``theta``: ``coef`` followed by the intercept when fitted (the column order of ``dfbetas``)."""
        if self.fit_intercept:
            return np.append(self.coef, self.intercept)
        return self.coef.copy()

    def influential(self, cooks_threshold: float | None = None) -> np.ndarray:
        """Indices of examples whose Cook's distance exceeds ``cooks_threshold`` (default ``4 / n``).

        The indices are ordered from the most to the least influential; NaN distances are never flagged. ``4/n``
        is a common screening rule of thumb, not a test; ``1.0`` is Cook's original, more conservative, cut-off.
        """
        n = self.n_samples
        threshold = (
            4.0 / n
            if cooks_threshold is None
            else check_nonnegative_float("cooks_threshold", cooks_threshold)
        )
        d = self.cooks_distance
        idx = np.flatnonzero(np.nan_to_num(d, nan=-np.inf) > threshold)
        return idx[np.argsort(-d[idx], kind="stable")]


def _as_float64(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise bad_value(
                name, value, "expected a real-valued tensor", f"pass {name}.real or a real tensor"
            )
        return value.detach().cpu().to(torch.float64).numpy()
    if hasattr(value, "toarray") and callable(value.toarray):  # scipy sparse: the closed form is dense anyway
        value = value.toarray()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise bad_value(
            name,
            value,
            "expected a numpy array or torch tensor of numbers",
            f"convert {name} with np.asarray",
        ) from None
    if arr.dtype.kind not in "biuf":
        raise bad_value(
            name,
            value,
            f"expected real numbers, got an array of dtype {arr.dtype}",
            f"convert {name} to a numeric dtype, e.g. np.asarray({name}, dtype=float)",
        )
    return arr.astype(np.float64, copy=True)


def _check_all_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"row {first[0]}" + (f", column {first[1]}" if len(first) > 1 else "")
        raise bad_value(
            name,
            arr,
            f"expected finite values, but it holds {int(bad.sum())} NaN/inf value(s), the first at {where} "
            f"({arr[first]!r})",
            "drop or impute the rows with missing or infinite values before computing diagnostics",
        )


def _validate(X: Any, y: Any, fit_intercept: Any, alpha: Any) -> tuple[np.ndarray, np.ndarray, bool, float]:
    if not isinstance(fit_intercept, (bool, np.bool_)):
        raise bad_value(
            "fit_intercept", fit_intercept, "expected True or False", "pass fit_intercept=True or False"
        )
    fit_intercept = bool(fit_intercept)
    if isinstance(alpha, (bool, np.bool_)):
        raise bad_value(
            "alpha", alpha, "expected a finite number >= 0", "pass alpha=0.0 (OLS) or a float > 0"
        )
    alpha = check_nonnegative_float("alpha", alpha)

    Xa = _as_float64(X, "X")
    ya = _as_float64(y, "y")
    if Xa.ndim != 2:
        fix = "reshape a single feature with X.reshape(-1, 1)" if Xa.ndim == 1 else "pass an (n, d) matrix"
        raise bad_value("X", X, f"expected a 2-D array of shape (n, d), got {Xa.ndim} dimension(s)", fix)
    if ya.ndim != 1:
        raise bad_value(
            "y",
            y,
            f"expected a 1-D array of shape (n,), got shape {ya.shape}",
            "pass a single target, e.g. y.ravel()",
        )
    n, d = Xa.shape
    if ya.shape[0] != n:
        raise bad_value(
            "y",
            y,
            f"expected one target per row of X (X has n={n} rows, y has {ya.shape[0]})",
            "pass X and y with the same number of examples",
        )
    if d == 0:
        raise bad_value("X", X, "expected at least one feature column", "pass X of shape (n, d) with d >= 1")
    _check_all_finite(Xa, "X")
    _check_all_finite(ya, "y")

    p = d + int(fit_intercept)
    if alpha == 0.0 and n <= p:
        raise bad_value(
            "X",
            X,
            f"ordinary least squares (alpha=0) needs more examples than fitted parameters, but n={n} <= p={p} "
            f"({d} coefficient(s){' + intercept' if fit_intercept else ''}), so the fit interpolates and the "
            "residual variance is undefined",
            "use ridge regression with alpha > 0, add examples, or remove features",
        )
    if alpha > 0.0 and n < 1 + int(fit_intercept):
        raise bad_value(
            "X",
            X,
            f"expected at least {1 + int(fit_intercept)} example(s) to estimate a residual variance, got n={n}",
            "pass more examples",
        )
    return Xa, ya, fit_intercept, alpha


def _freeze(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    arr.setflags(write=False)
    return arr


def linear_regression_diagnostics(
    X: Any, y: Any, fit_intercept: bool = True, alpha: float = 0.0
) -> RegressionDiagnostics:
    """Fit OLS (``alpha=0``) or ridge (``alpha>0``) and return exact closed-form influence diagnostics.

    The objective is ``||y - X coef - intercept||^2 + alpha ||coef||^2`` (sklearn ``Ridge``'s; the intercept is
    not penalised). All leave-one-out quantities are exact Sherman-Morrison deletions, not approximations; the
    formulas are in the :mod:`datatrace.verification.diagnostics` module docstring. Work is ``O(n d min(n, d))`` for one thin
    SVD, and memory ``O(n d)``; the ``n x n`` hat matrix is never formed.

    Args:
        X: ``(n, d)`` features, a numpy array or torch tensor (converted to float64 numpy).
        y: ``(n,)`` targets.
        fit_intercept: fit an unpenalised intercept; it becomes the last column of ``dfbetas`` and
            ``loo_coef_change``.
        alpha: ridge penalty ``>= 0``. With ``alpha = 0`` the design must have full column rank and ``n > p``.

    Returns:
        A frozen :class:`RegressionDiagnostics`.

    Raises:
        ValueError: for malformed input (shapes, NaN/inf, negative ``alpha``), ``n <= p`` under OLS, or
            rank-deficient ``X`` under OLS (the message names the dependent columns).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(30, 2))
        >>> y = X @ np.array([1.0, -2.0]) + 0.5 + 0.1 * rng.normal(size=30)
        >>> y[7] += 3.0  # plant an outlier
        >>> diag = linear_regression_diagnostics(X, y)
        >>> diag.dfbetas.shape  # columns: coef_0, coef_1, intercept
        (30, 3)
        >>> int(np.argmax(diag.cooks_distance))
        7
        >>> int(diag.influential()[0])
        7
        >>> bool(np.isclose(diag.dof, 3.0))
        True
    """
    Xa, ya, fit_intercept, alpha = _validate(X, y, fit_intercept, alpha)
    n, d = Xa.shape
    p = d + int(fit_intercept)

    if fit_intercept:
        x_mean = Xa.mean(axis=0)
        y_mean = float(ya.mean())
        Xc = Xa - x_mean
        yc = ya - y_mean
    else:
        x_mean = np.zeros(d)
        y_mean = 0.0
        Xc, yc = Xa, ya

    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)  # U (n, k), s (k,), Vt (k, d), k = min(n, d)
    if alpha == 0.0:
        tol = (s[0] if s.size else 0.0) * max(n, d) * np.finfo(np.float64).eps
        rank = int(np.sum(s > tol))
        if rank < d:
            # n > p guarantees k = d, so Vt[rank:] spans the (near) null space of Xc.
            weight = np.abs(Vt[rank:]).max(axis=0)
            cols = np.flatnonzero(weight > 1e-6 * weight.max()).tolist()
            context = (
                " after removing column means (i.e. together with the intercept)" if fit_intercept else ""
            )
            raise bad_value(
                "X",
                X,
                f"ordinary least squares needs full column rank, but X has rank {rank} < {d}{context}: "
                f"columns {cols} are (nearly) linearly dependent"
                + (" (a constant column is dependent on the intercept)" if fit_intercept else ""),
                "drop or combine the redundant columns, or use ridge regression with alpha > 0",
            )

    # alpha > 0, or alpha = 0 with every singular value > 0 (checked above): no division by zero below.
    s2 = s**2
    shrink = s2 / (s2 + alpha)  # eigenvalues of the centred smoother, in [0, 1]
    f = s / (s2 + alpha)  # G xc_i = V diag(f) U_i^T with G = (Xc^T Xc + alpha I)^{-1}

    coef = Vt.T @ (f * (U.T @ yc))
    intercept = y_mean - float(x_mean @ coef) if fit_intercept else 0.0
    fitted = Xa @ coef + intercept
    resid = ya - fitted

    U2 = U**2
    const = 1.0 / n if fit_intercept else 0.0
    leverage = const + U2 @ shrink
    dof = float(int(fit_intercept) + shrink.sum())
    h2_diag = const + U2 @ (shrink**2)  # [H^2]_ii = ||Z u_i||^2
    pen_u = alpha * (U2 @ (f**2)) if alpha > 0 else np.zeros(n)  # u_i^T P u_i

    # u_i = A^{-1} z_i, in (coef, intercept) coordinates.
    u_coef = (U * f) @ Vt  # (n, d): rows G xc_i
    if fit_intercept:
        u = np.column_stack([u_coef, 1.0 / n - u_coef @ x_mean])
    else:
        u = u_coef

    rss = float(resid @ resid)
    sigma2 = rss / (n - dof)
    if rss <= (64 * np.finfo(np.float64).eps) ** 2 * float(ya @ ya):
        warnings.warn(
            "the model fits y exactly (residuals are zero up to rounding), so studentized residuals, Cook's "
            "distances, DFFITS and DFBETAS are ratios of rounding errors and carry no information. Check that y "
            "is not a linear function of X (e.g. a leaked target column).",
            RuntimeWarning,
            stacklevel=2,
        )
    one_minus_h = 1.0 - leverage
    degenerate = one_minus_h < _LEVERAGE_ONE_TOL
    if degenerate.any():
        rows = np.flatnonzero(degenerate)
        warnings.warn(
            f"{rows.size} example(s) have leverage 1 (first rows: {rows[:10].tolist()}): deleting one makes the "
            "model unidentifiable, so their leave-one-out diagnostics are NaN. Such a row is fitted exactly by "
            "a parameter no other row informs; consider removing it or using alpha > 0.",
            RuntimeWarning,
            stacklevel=2,
        )
    safe_1mh = np.where(degenerate, np.nan, one_minus_h)

    with np.errstate(divide="ignore", invalid="ignore"):
        c = resid / safe_1mh  # leave-one-out prediction error y_i - z_i^T theta_(i)
        loo_change = -u * c[:, None]  # theta_(i) - theta

        coef_loo = coef[None, :] + loo_change[:, :d]
        rss_loo = (
            rss + alpha * float(coef @ coef) - resid * c - alpha * np.einsum("ij,ij->i", coef_loo, coef_loo)
        )
        rss_loo = np.maximum(rss_loo, 0.0)
        dof_loo = dof - pen_u / safe_1mh
        df_loo = n - 1 - dof_loo
        loo_sigma = np.sqrt(np.where(df_loo > 1e-12, rss_loo / df_loo, np.nan))

        s_full = np.sqrt(sigma2)
        student = resid / (s_full * np.sqrt(safe_1mh))
        external = resid / (loo_sigma * np.sqrt(safe_1mh))
        cooks = c**2 * h2_diag / (p * sigma2)
        dffits = np.sqrt(leverage) * c / loo_sigma  # = h_ii c_i / (s_(i) sqrt(h_ii))

        # Diagonal of C = A^{-1} Z^T Z A^{-1} (= (Z^T Z)^{-1} for OLS): the coefficient covariance / sigma^2.
        c_coef = (Vt.T**2) @ f**2  # G Xc^T Xc G = V diag(s^2 / (s^2 + alpha)^2) V^T
        if fit_intercept:
            c_int = 1.0 / n + float(x_mean @ (Vt.T @ (f**2 * (Vt @ x_mean))))
            c_diag = np.append(c_coef, c_int)
        else:
            c_diag = c_coef
        scale = np.sqrt(c_diag)
        dfbetas = np.where(scale[None, :] > 0, -loo_change / (loo_sigma[:, None] * scale[None, :]), 0.0)

    return RegressionDiagnostics(
        coef=_freeze(coef),
        intercept=float(intercept),
        fitted=_freeze(fitted),
        residuals=_freeze(resid),
        leverage=_freeze(leverage),
        dof=dof,
        sigma2=float(sigma2),
        loo_sigma=_freeze(loo_sigma),
        studentized_residuals=_freeze(student),
        external_studentized_residuals=_freeze(external),
        cooks_distance=_freeze(cooks),
        dffits=_freeze(dffits),
        dfbetas=_freeze(dfbetas),
        loo_coef_change=_freeze(loo_change),
        fit_intercept=fit_intercept,
        alpha=alpha,
    )
