"""Conjugate gradient on Hessian- or Gauss-Newton-vector products (Martens 2010; Koh & Liang 2017).

``solve(V)`` runs :func:`datatrace.linalg.conjugate_gradient` on ``(A + damping I) x = v`` for every row ``v``,
``A`` the Hessian or Gauss-Newton matrix of the objective (:mod:`datatrace.gradients.products`).
``damping="auto"`` is :func:`datatrace.linalg.positive_definite_damping` of a short Lanczos estimate
(:mod:`datatrace.curvature.matrix_free`). That estimate can miss small negative eigenvalues next to a large
positive spectrum; CG itself then meets a direction ``d`` with ``d^T (A + damping I) d <= 0``, whose Rayleigh
quotient bounds ``lambda_min`` from above. With ``damping="auto"`` CG raises the damping by the same rule
(:func:`datatrace.linalg.raised_damping`) and solves every row again, up to ``MAX_DAMPING_RAISES`` times, logging
a warning, rather than keeping a truncated iterate whose residual can exceed the right-hand side.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from datatrace import linalg
from datatrace.curvature.base import Curvature, check_damping, check_random_state
from datatrace.curvature.matrix_free import MatrixFree
from datatrace.curvature.registry import make_curvature
from datatrace.data import DataSource
from datatrace.errors import (
    ConvergenceWarning,
    bad_value,
    check_choice,
    check_nonnegative_float,
    check_positive_int,
)
from datatrace.gradients.functional import FunctionalModel
from datatrace.gradients.products import MATRICES, preconditioner_diagonal
from datatrace.linalg import conjugate_gradient, positive_definite_damping, raised_damping

logger = logging.getLogger(__name__)

#: named preconditioners of CG (besides None and a Curvature instance); "kfac" and "ekfac" are built by name
#: through the registry
PRECONDITIONERS = ("diagonal", "kfac", "ekfac")
#: how often CG with damping="auto" raises its damping after meeting negative curvature it was not told about
MAX_DAMPING_RAISES = 6


class CG(MatrixFree):
    """Conjugate gradient on Hessian- or Gauss-Newton-vector products (Martens 2010; Koh & Liang 2017).

    Solves ``(A + damping I) x = v`` for all rows ``v`` at once, as independent CG recurrences that share each
    product. Exact (to ``rtol``) where ``A + damping I`` is positive definite: on a convex model it reproduces
    ``curvature="exact"`` at a fraction of the memory. Every solve records in ``info`` the iterations (max and
    mean over rows), the worst final relative residual and how many rows did not converge or met non-positive
    curvature, and warns (:class:`ConvergenceWarning`) in those two cases.

    A singular ``A`` (parameters without weight decay, e.g. the softmax's shift-invariant biases) is fine for
    training-loss gradients, which lie in its range: CG from zero then converges to the pseudo-inverse solution,
    as the dense routes do. A query measurement whose gradient has a component in the null space (a single
    logit, say) cannot converge; pass a small positive ``damping`` there.

    Args:
        matrix: ``"hessian"`` (default, the curvature of ``curvature="exact"``) or ``"gauss-newton"`` (positive
            semi-definite: the better choice for a network).
        damping: ``"auto"`` (0 unless the Lanczos estimate finds negative curvature, then a shift that makes the
            system positive definite; see :mod:`datatrace.curvature.matrix_free`) or a number ``>= 0``.
        max_iter: iterations per row; ``None`` means ``min(2 p, 1000)`` (CG needs at most ``p`` in exact
            arithmetic).
        rtol: stop a row when ``||v - (A + damping I) x|| <= rtol ||v||``.
        preconditioner: ``None``; ``"diagonal"``: divide residuals by ``diag(G) + damping`` with ``G`` the
            exact Gauss-Newton diagonal (the empirical-Fisher diagonal for a task without ``outputs``), computed
            once in ``fit`` for the price of ``k`` per-example gradient passes (``k`` outputs per example); it
            pays on badly scaled parameters, on well-scaled ones it changes little. ``"ekfac"`` or ``"kfac"``:
            apply :class:`~datatrace.curvature.kfac.EKFAC` / ``KFAC`` (built by name through the registry, fitted in
            ``fit`` with CG's damping, two passes over the data) to the residuals, which captures the layer
            structure of the curvature. It is not always a win (``benchmarks/bench_curvature.py`` measures it), so
            it is an option, not the default. Or any unfitted
            :class:`~datatrace.curvature.Curvature` whose ``solve`` is symmetric positive definite; ``fit``
            fits it on the same model and data.
        block_size: rows solved together (bounds memory: five ``(block_size, p)`` work arrays); ``None``: all.
        random_state: seed of the Lanczos start used by ``damping="auto"``.

    Example:
        >>> inf = InfluenceFunction(model, task, curvature=CG(rtol=1e-8)).fit(train)  # doctest: +SKIP
        >>> inf.curvature_.info["iterations"]  # doctest: +SKIP
    """

    name = "cg"
    collective_solve = True

    def __init__(
        self,
        matrix: str = "hessian",
        damping: float | str = "auto",
        max_iter: int | None = None,
        rtol: float = 1e-6,
        preconditioner: str | None = None,
        block_size: int | None = None,
        random_state: int = 0,
    ) -> None:
        super().__init__()
        self.matrix = check_choice("matrix", matrix, MATRICES)
        self.damping = check_damping(damping)
        self.max_iter = None if max_iter is None else check_positive_int("max_iter", max_iter)
        rtol_value = check_nonnegative_float("rtol", rtol)
        if not 0 < rtol_value < 1:
            raise bad_value("rtol", rtol, "expected 0 < rtol < 1", "pass e.g. rtol=1e-6")
        self.rtol = rtol_value
        if not (preconditioner in (None, *PRECONDITIONERS) or isinstance(preconditioner, Curvature)):
            raise bad_value(
                "preconditioner",
                preconditioner,
                f"expected None, one of {PRECONDITIONERS} or a Curvature instance",
                "pass preconditioner='ekfac' (layer structure) or 'diagonal' (scales)",
            )
        self.preconditioner = preconditioner
        self.block_size = None if block_size is None else check_positive_int("block_size", block_size)
        self.random_state = check_random_state(random_state)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> CG:
        source = self.bind(fmodel, data, self.matrix)
        p = fmodel.num_params
        info: dict[str, Any] = {"route": self.name, "matrix": self.matrix, "num_params": p}
        if self.damping == "auto":
            spectrum = self.spectrum(progress)
            damping = positive_definite_damping(spectrum)
            info.update(spectrum.as_info())
            if spectrum.has_negative:
                logger.info(
                    "CG: the %s has negative curvature (Lanczos lambda_min ~ %.3g, lambda_max ~ %.3g); "
                    "damping='auto' shifts it by %.3g to make it positive definite.",
                    self.matrix,
                    spectrum.lambda_min,
                    spectrum.lambda_max,
                    damping,
                )
        else:
            damping = float(self.damping)
        self.damping_ = damping
        self.spectrum_ = spectrum if self.damping == "auto" else None
        self.max_iter_ = self.max_iter if self.max_iter is not None else min(2 * p, 1000)
        self.preconditioner_: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None
        if self.preconditioner == "diagonal":
            diag = preconditioner_diagonal(fmodel, source, progress) + damping
            floor = float(diag[diag > 0].mean()) if bool((diag > 0).any()) else 1.0
            self.preconditioner_ = 1.0 / torch.where(diag > 1e-12 * floor, diag, torch.full_like(diag, floor))
        elif self.preconditioner is not None:
            route = self.preconditioner
            if isinstance(route, str):
                route = make_curvature(route, damping=damping)
            route.fit(fmodel, source, progress)
            self.preconditioner_route_ = route
            self.preconditioner_ = route.solve
            info["preconditioner_info"] = route.info
        self.progress_ = progress
        info.update(
            {
                "damping": damping,
                "rtol": self.rtol,
                "max_iter": self.max_iter_,
                "preconditioner": self.preconditioner
                if isinstance(self.preconditioner, str)
                else repr(self.preconditioner)
                if self.preconditioner is not None
                else "none",
                "solves": 0,
            }
        )
        self.info_ = info
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        m = rows.shape[0]
        step = self.block_size or max(m, 1)
        for attempt in range(MAX_DAMPING_RAISES + 1):
            parts, iterations, residuals, negative, converged = [], [], [], [], []
            min_rayleigh = math.inf
            for start in range(0, m, step):
                result = conjugate_gradient(
                    self.operator_,
                    rows[start : start + step],
                    damping=self.damping_,
                    rtol=self.rtol,
                    max_iter=self.max_iter_,
                    preconditioner=self.preconditioner_,
                    progress=self.progress_,
                )
                parts.append(result.solution)
                iterations.append(result.iterations)
                residuals.append(result.residuals)
                negative.append(result.negative_curvature)
                converged.append(result.converged)
                min_rayleigh = min(min_rayleigh, result.min_rayleigh)
            met_negative = bool(m) and bool(torch.cat(negative).any())
            if not (met_negative and self.damping == "auto" and attempt < MAX_DAMPING_RAISES):
                break
            self._raise_damping(min_rayleigh)
        solution = torch.cat(parts) if parts else rows.clone()
        if m:
            self._record(
                torch.cat(iterations), torch.cat(residuals), torch.cat(negative), torch.cat(converged)
            )
        return solution[0] if one else solution

    def _raise_damping(self, min_rayleigh: float) -> None:
        """``damping="auto"`` met ``d^T (A + damping I) d <= 0``: ``lambda_min(A) <= min_rayleigh - damping``, so
        apply the module's shift rule to that bound (and at least double the shift), and say so."""
        old = self.damping_
        new, lambda_min = raised_damping(self.spectrum_, old, min_rayleigh)
        self.damping_ = new
        self.info_.update(
            {
                "damping": new,
                "damping_raises": int(self.info_.get("damping_raises", 0)) + 1,
                "lambda_min_bound": lambda_min,
            }
        )
        logger.warning(
            "CG met negative curvature that the %d-step Lanczos estimate missed (Rayleigh quotient %.3g, so "
            "lambda_min(%s) <= %.3g): damping='auto' raises the damping from %.3g to %.3g and solves again.%s",
            linalg.SPECTRUM_STEPS,
            min_rayleigh,
            self.matrix,
            lambda_min,
            old,
            new,
            " Earlier solves of this fitted route used the smaller damping; refit to make them consistent."
            if self.info_.get("solves", 0)
            else "",
        )

    def _record(
        self,
        iterations: torch.Tensor,
        residuals: torch.Tensor,
        negative: torch.Tensor,
        converged: torch.Tensor,
    ) -> None:
        m = int(iterations.numel())
        stats = {
            "iterations": int(iterations.max()),
            "iterations_mean": float(iterations.double().mean()),
            "max_relative_residual": float(residuals.max()),
            "num_rows": m,
            "num_unconverged": int((~converged & ~negative).sum()),
            "num_negative_curvature": int(negative.sum()),
            "solves": int(self.info_.get("solves", 0)) + 1,
        }
        self.info_.update(stats)
        self.iterations_ = iterations
        self.residuals_ = residuals
        logger.info(
            "CG solved %d right-hand side(s): %d iterations at most (mean %.1f), worst relative residual %.2e.",
            m,
            stats["iterations"],
            stats["iterations_mean"],
            stats["max_relative_residual"],
        )
        if stats["num_negative_curvature"]:
            warnings.warn(
                f"CG met non-positive curvature p^T (A + damping I) p <= 0 on {stats['num_negative_curvature']} of "
                f"{m} right-hand side(s): the {self.matrix} plus damping={self.damping_:.3g} is not positive "
                "definite (a network away from a strict minimum). Those rows kept their last iterate (truncated "
                "CG). Fix: use damping='auto' (it shifts by the most negative eigenvalue estimate), a larger "
                "damping, or matrix='gauss-newton'.",
                ConvergenceWarning,
                stacklevel=3,
            )
        if stats["num_unconverged"]:
            warnings.warn(
                f"CG stopped after max_iter={self.max_iter_} iterations with {stats['num_unconverged']} of {m} "
                f"right-hand side(s) above rtol={self.rtol:g} (worst relative residual "
                f"{stats['max_relative_residual']:.2e}). Fix: raise max_iter, raise damping, or try "
                "preconditioner='ekfac' (or 'diagonal' for badly scaled parameters).",
                ConvergenceWarning,
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return (
            f"CG(matrix={self.matrix!r}, damping={self.damping!r}, max_iter={self.max_iter!r}, "
            f"rtol={self.rtol!r}, preconditioner={self.preconditioner!r})"
        )


__all__ = ["CG", "MAX_DAMPING_RAISES", "PRECONDITIONERS"]
