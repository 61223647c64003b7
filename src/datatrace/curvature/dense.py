"""Exact dense curvature: the Hessian and the Gauss-Newton matrix, inverted through an eigendecomposition.

For a model with ``p`` parameters in scope these routes form the ``p x p`` matrix ``C`` of the training objective
(regulariser included), decompose ``C = V diag(e) V^T`` in the working dtype (float64 by default) and apply

    C^+ v = V diag(phi(e)) V^T v,     phi(e) = 1 / (policy(e) + damping)

with the eigenvalue policy of :func:`datatrace.linalg.spectral_inverse`, all its decisions reported in ``info``:

* **zero eigenvalues** (:func:`datatrace.linalg.zero_tolerance`, e.g. the softmax's shift invariance of
  unpenalised biases): a pseudo-inverse. Per-example gradients have no component there, so nothing is lost.
* **negative eigenvalues** (a network away from a strict minimum), ``negative=``: ``"clip"`` (default) sets them
  to zero, so with ``damping`` they are treated as flat directions and with no damping they are dropped;
  ``"abs"`` uses ``|e|`` (saddle-free Newton); ``"keep"`` uses them as they are (the literal Newton step, which
  can explode near zero).
* **damping** ``lambda_d >= 0`` added to every kept eigenvalue. ``"auto"`` at a minimum of the objective (or when
  no attributor says otherwise): 0 when no eigenvalue is negative (a convex objective, where the exact inverse is
  the right answer) and otherwise ``0.01 * mean(|e|)``, a Levenberg-Marquardt style choice that keeps the inverse
  well away from the noise of small eigenvalues. Away from a minimum (a model trained for a budget, see
  :class:`~datatrace.curvature.base.TrainingState`): the damping that keeps ten effective directions per model
  output (:func:`datatrace.linalg.dof_damping`).

Koh & Liang (2017) use the exact Hessian; the Gauss-Newton matrix (Martens 2020) is positive semi-definite for
convex losses and is what Bae et al. (2022) show influence functions on networks actually approximate (the
proximal Bregman response).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from tqdm.auto import tqdm

from datatrace.curvature.base import DEFAULT_MAX_DENSE_BYTES, Curvature, check_rtol, format_bytes
from datatrace.curvature.registry import matrix_free_names
from datatrace.data import DataSource
from datatrace.errors import (
    bad_value,
    check_choice,
    check_finite,
    check_nonnegative_float,
    check_positive_int,
)
from datatrace.gradients.functional import FunctionalModel
from datatrace.linalg import NEGATIVE_POLICIES, spectral_inverse


class DenseCurvature(Curvature):
    """Shared machinery of the dense routes: build ``C``, eigendecompose, apply the damped (pseudo-)inverse."""

    def __init__(
        self,
        damping: float | str = "auto",
        negative: str = "clip",
        rtol: float | None = None,
        max_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    ) -> None:
        super().__init__()
        if damping != "auto":
            damping = check_nonnegative_float("damping", damping)
        self.damping = damping
        self.negative = check_choice("negative", negative, NEGATIVE_POLICIES)
        self.rtol = check_rtol(rtol)
        self.max_bytes = check_positive_int("max_bytes", max_bytes)

    @abstractmethod
    def _matrix(self, fmodel: FunctionalModel, data: DataSource, progress: bool) -> torch.Tensor:
        """The ``p x p`` curvature matrix of the objective, regulariser included."""

    def check_size(self, fmodel: FunctionalModel) -> None:
        """Refuse a ``p x p`` matrix (with its eigenvectors and workspace: ``3 p^2`` numbers) above ``max_bytes``.
        Cheap (it needs only ``p`` and the dtype): :class:`~datatrace.InfluenceFunction` calls it before its
        gradient pass, and :meth:`fit` again."""
        p = fmodel.num_params
        itemsize = torch.empty((), dtype=fmodel.dtype).element_size()
        need = 3 * p * p * itemsize  # matrix, eigenvectors, workspace
        if need > self.max_bytes:
            alternatives = ", ".join(repr(n) for n in matrix_free_names()) or "none registered yet"
            raise MemoryError(
                f"curvature={self.name!r} forms a dense {p:,} x {p:,} matrix: about {format_bytes(need)} in "
                f"{fmodel.dtype}, above the limit max_bytes={format_bytes(self.max_bytes)}. Fix: restrict the "
                f"parameters in scope with params= (e.g. the last layer), raise max_bytes if the memory is "
                f"there, or use a route that never forms the matrix ({alternatives})."
            )

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> DenseCurvature:
        self.check_size(fmodel)
        matrix = self._matrix(fmodel, data, progress)
        check_finite(
            matrix,
            f"the {self.name} curvature matrix",
            "Fix: check the model's outputs and loss for NaN/inf on the training data (datatrace checked the "
            "data itself), lower the learning rate that produced the model, or fit in float64.",
        )
        evals, evecs = torch.linalg.eigh(matrix)
        self._set_spectrum(evals, evecs, fmodel)
        self.matrix_ = matrix
        return self

    def _set_spectrum(self, evals: torch.Tensor, evecs: torch.Tensor, fmodel: FunctionalModel) -> None:
        inv, damping, info = spectral_inverse(
            evals, self.damping, self.negative, self.rtol, self.name, self.dof_target(fmodel.num_params)
        )
        self.evals_, self.evecs_, self.inv_evals_ = evals, evecs, inv
        self.damping_ = damping
        self.info_ = info

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        self.check_fitted("evecs_")
        v = vectors.to(self.evecs_.dtype)
        return ((v @ self.evecs_) * self.inv_evals_) @ self.evecs_.T

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.check_fitted("matrix_")
        v = vectors.to(self.evecs_.dtype)
        return v @ self.matrix_ + self.damping_ * v

    def __repr__(self) -> str:
        return f"{type(self).__name__}(damping={self.damping!r}, negative={self.negative!r})"


class ExactHessian(DenseCurvature):
    """The exact Hessian of the training objective, ``(1/n) sum_i d^2 l_i + diag(lambda)``."""

    name = "exact"

    def _matrix(self, fmodel: FunctionalModel, data: DataSource, progress: bool) -> torch.Tensor:
        with tqdm(total=fmodel.num_params, desc="Hessian columns", disable=not progress, leave=False) as bar:
            return fmodel.dense_hessian(data, progress=bar.update)


class GaussNewton(DenseCurvature):
    """The generalised Gauss-Newton matrix ``(1/n) sum_i J_i^T (d^2 l_i / d o^2) J_i + diag(lambda)``."""

    name = "gauss-newton"

    def _matrix(self, fmodel: FunctionalModel, data: DataSource, progress: bool) -> torch.Tensor:
        if not fmodel.task.has_outputs:
            raise bad_value(
                "curvature",
                self.name,
                f"{type(fmodel.task).__name__} does not split its loss into outputs(model, batch) and "
                "loss_from_outputs(outputs, batch), which Gauss-Newton needs",
                "define both methods on the task, or use curvature='exact'",
            )
        with tqdm(total=len(data), desc="Gauss-Newton", disable=not progress, leave=False) as bar:
            return fmodel.dense_gauss_newton(data, progress=bar.update)


__all__ = ["DEFAULT_MAX_DENSE_BYTES", "NEGATIVE_POLICIES", "DenseCurvature", "ExactHessian", "GaussNewton"]
