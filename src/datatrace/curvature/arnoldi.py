"""Arnoldi: the top eigenpairs of the curvature from a Krylov basis, inverted on their span (Schioppa et al. 2022).

:func:`datatrace.linalg.lanczos` on the products ``A v`` gives ``T = Q A Q^T``; its Ritz pairs of largest ``|e|``
stand for the top eigenpairs of ``A`` and :func:`datatrace.linalg.spectral_inverse` (the dense routes' policy)
inverts them. The rest of the spectrum is either one isotropic block at its estimated mean or dropped.
"""

from __future__ import annotations

import torch

from datatrace.curvature.base import DEFAULT_MAX_DENSE_BYTES, check_damping, check_random_state
from datatrace.curvature.matrix_free import MatrixFree
from datatrace.data import DataSource
from datatrace.errors import bad_value, check_choice, check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.gradients.products import MATRICES
from datatrace.linalg import (
    LM_FRACTION,
    NEGATIVE_POLICIES,
    dof_damping,
    lanczos,
    mean_abs_eigenvalue,
    spectral_inverse,
)


class Arnoldi(MatrixFree):
    """Top eigenpairs of the curvature from an Arnoldi/Lanczos run, inverted on their span (Schioppa et al. 2022).

    ``n_iter`` Krylov steps on ``A`` (one product each, from a seeded random start, float64 with full
    reorthogonalisation) give the projected matrix ``T = Q A Q^T``; its eigenpairs (Ritz pairs) ordered by
    ``|e|`` give the top ``rank`` eigenvalues ``e`` and eigenvectors ``U`` of ``A``. Then

        solve(v) = U diag(phi(e)) U^T v,     phi(e) = 1 / (policy(e) + damping)

    with the dense routes' policy for zero and negative eigenvalues and their ``negative=`` names
    (:func:`datatrace.linalg.spectral_inverse`). Components outside the top-``rank`` subspace:

    * ``complement="mean"`` (default): treated as one isotropic block ``c (I - U U^T)`` with ``c`` the mean of the
      remaining eigenvalues, estimated as ``(tr|A| - sum |e_kept|) / (p - rank)`` from the same run's stochastic
      Lanczos quadrature and capped at the smallest kept ``|e|`` (the remaining ones cannot be larger): the
      directions of small curvature carry most of ``H^{-1} g``.
    * ``complement="drop"``: dropped, as in the paper (the estimate keeps only the directions of largest
      curvature).

    With ``rank >= p`` (and
    then ``n_iter = p``) the Krylov basis is complete and the answer equals the dense one (``curvature="exact"``
    for ``matrix="hessian"``).

    ``damping="auto"``: the dense rule, 0 when no kept eigenvalue is negative and otherwise ``0.01 mean |e|``
    over all ``p`` eigenvalues (exact with a complete basis, else estimated by stochastic Lanczos quadrature on
    the same run); away from a minimum, the dense routes' effective-directions rule
    (:func:`datatrace.linalg.dof_damping`) on the kept eigenvalues plus ``p - rank`` copies of the complement.

    Args:
        matrix: ``"hessian"`` or ``"gauss-newton"``.
        rank: eigenpairs kept.
        damping: ``"auto"`` or a number ``>= 0``.
        negative: ``"clip"`` (default), ``"abs"`` or ``"keep"``, as in the dense routes.
        n_iter: Krylov steps (products); ``None`` means ``min(p, 2 * rank)``; must be ``>= rank``. More steps make
            the top ``rank`` Ritz pairs more accurate.
        random_state: seed of the random start.
        max_bytes: memory budget for the float64 basis ``(n_iter, p)``.
        complement: ``"mean"`` or ``"drop"``, see above.

    ``info`` reports the kept spectrum, restarts, and ``captured_fraction``: the estimated share of ``tr |A|``
    held by the kept eigenvalues.
    """

    name = "arnoldi"

    def __init__(
        self,
        matrix: str = "hessian",
        rank: int = 200,
        damping: float | str = "auto",
        negative: str = "clip",
        n_iter: int | None = None,
        random_state: int = 0,
        max_bytes: int = DEFAULT_MAX_DENSE_BYTES,
        complement: str = "mean",
    ) -> None:
        super().__init__()
        self.complement = check_choice("complement", complement, ("mean", "drop"))
        self.matrix = check_choice("matrix", matrix, MATRICES)
        self.rank = check_positive_int("rank", rank)
        self.damping = check_damping(damping)
        self.negative = check_choice("negative", negative, NEGATIVE_POLICIES)
        if n_iter is not None:
            check_positive_int("n_iter", n_iter)
            if n_iter < rank:
                raise bad_value(
                    "n_iter", n_iter, f"expected n_iter >= rank={rank}", f"pass n_iter >= {rank} or None"
                )
        self.n_iter = n_iter
        self.random_state = check_random_state(random_state)
        self.max_bytes = check_positive_int("max_bytes", max_bytes)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> Arnoldi:
        self.bind(fmodel, data, self.matrix)
        p = fmodel.num_params
        rank = min(self.rank, p)
        steps = p if self.rank >= p else min(p, self.n_iter if self.n_iter is not None else 2 * self.rank)
        need = steps * p * 8 * 2
        if need > self.max_bytes:
            raise MemoryError(
                f"Arnoldi with n_iter={steps} keeps a float64 basis of {steps:,} x {p:,} (about "
                f"{need / 1024**3:.1f} GiB with workspace), above max_bytes={self.max_bytes / 1024**3:.1f} GiB. "
                "Fix: lower rank and n_iter, restrict params=, or raise max_bytes."
            )
        krylov = lanczos(
            self.operator_,
            p,
            steps,
            random_state=self.random_state,
            dtype=fmodel.dtype,
            device=fmodel.device,
            progress=progress,
            desc="Arnoldi",
        )
        ritz, vectors = torch.linalg.eigh(krylov.projected)
        mean_abs = mean_abs_eigenvalue(krylov, ritz, vectors[0])
        keep = torch.argsort(ritz.abs(), descending=True)[:rank]
        evals = ritz[keep]
        evecs = krylov.basis.T @ vectors[:, keep]  # (p, rank), float64
        complete = krylov.complete and rank == p
        rest_value = 0.0
        if not complete and rank < p:  # the mean of the eigenvalues outside the kept ones, capped by them
            rest = (p * mean_abs - float(evals.abs().sum())) / (p - rank)
            rest_value = min(max(rest, 0.0), float(evals.abs().min()))
        target = self.dof_target(p)
        if self.damping == "auto" and target is not None:
            # the effective directions count the complement too: p - rank copies of its value
            counted = self.complement == "mean" and not complete
            values = torch.cat([evals, evals.new_tensor([rest_value])]) if counted else evals
            weights = torch.ones_like(values)
            if counted:
                weights[-1] = p - rank
            used = dof_damping(values, target, weights)
            if (
                used == 0.0 and not complete
            ):  # the kept directions hold fewer than the target: damp at their floor
                used = float(evals.abs().min())
            inv, damping, spectral_info = spectral_inverse(evals, used, self.negative, None, self.name)
            spectral_info["damping_rule"] = f"dof={target:g}"
        else:
            inv, damping, spectral_info = spectral_inverse(
                evals, self.damping, self.negative, None, self.name
            )
        if self.damping == "auto" and target is None and spectral_info["num_negative"] and not complete:
            # the dense rule's mean |e| runs over all p eigenvalues, not only the kept ones
            inv, damping, spectral_info = spectral_inverse(
                evals, LM_FRACTION * mean_abs, self.negative, None, self.name
            )
        self.evals_ = evals.to(fmodel.dtype)
        self.evecs_ = evecs.to(fmodel.dtype)
        self.inv_evals_ = inv.to(fmodel.dtype)
        self.damping_ = damping
        self.complement_value_ = 0.0
        self.complement_inv_ = 0.0
        if self.complement == "mean" and not complete and rank < p:
            if rest_value + self.damping_ > 0:
                self.complement_value_ = rest_value
                self.complement_inv_ = 1.0 / (rest_value + self.damping_)
        info = dict(spectral_info)
        info.update(
            {
                "matrix": self.matrix,
                "num_params": p,
                "rank": rank,
                "n_iter": steps,
                "restarts": krylov.restarts,
                "exact": krylov.complete and rank == p,
                "mean_abs_eigenvalue_estimate": mean_abs,
                "captured_fraction": min(1.0, float(evals.abs().sum()) / max(p * mean_abs, 1e-300)),
                "complement": self.complement,
                "complement_eigenvalue": self.complement_value_,
            }
        )
        self.info_ = info
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        coords = rows @ self.evecs_
        out = (coords * self.inv_evals_) @ self.evecs_.T
        if self.complement_inv_:
            out = out + (rows - coords @ self.evecs_.T) * self.complement_inv_
        return out[0] if one else out

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(U diag(e) U^T + damping I) v``: the rank-``rank`` curvature this route inverts, plus damping."""
        rows, one = self.rows(vectors)
        coords = rows @ self.evecs_
        out = (coords * self.evals_) @ self.evecs_.T + self.damping_ * rows
        if self.complement_inv_:
            out = out + (rows - coords @ self.evecs_.T) * self.complement_value_
        return out[0] if one else out

    def __repr__(self) -> str:
        return (
            f"Arnoldi(matrix={self.matrix!r}, rank={self.rank}, damping={self.damping!r}, "
            f"negative={self.negative!r}, n_iter={self.n_iter!r}, random_state={self.random_state}, "
            f"complement={self.complement!r})"
        )


__all__ = ["Arnoldi"]
