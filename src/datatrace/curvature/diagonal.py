"""``curvature="diagonal"``: a diagonal of the curvature, inverted elementwise.

``C = diag(A)`` for one of three diagonals of :mod:`datatrace.gradients.products` (``matrix=``), by cost:

- ``"gauss-newton"`` (default): the exact diagonal of ``G`` from per-example output Jacobians
  (:func:`ggn_diagonal`, ``k`` backward passes per example, ``k`` outputs); positive semi-definite.
- ``"empirical-fisher"``: ``(1/n) sum_i g_i^2 + lambda`` (:func:`empirical_fisher_diagonal`), one pass of
  per-example gradients; the Hessian's diagonal only as far as the empirical Fisher approximates the Hessian.
- ``"hessian"``: Hutchinson's estimator with seeded Rademacher probes (:func:`hutchinson_diagonal`; Bekas,
  Kokiopoulou & Saad 2007).

Negative and zero entries follow :func:`datatrace.linalg.spectral_inverse` (``negative=``, pseudo-inverse of
zeros, the dense routes' ``"auto"`` damping): a diagonal is its own eigendecomposition.
"""

from __future__ import annotations

import torch

from datatrace.curvature.base import Curvature, check_damping, check_random_state
from datatrace.data import DataSource, as_data_source
from datatrace.errors import check_choice, check_finite, check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.gradients.products import (
    empirical_fisher_diagonal,
    ggn_diagonal,
    hutchinson_diagonal,
    require_outputs,
)
from datatrace.linalg import NEGATIVE_POLICIES, spectral_inverse

DIAGONALS = ("gauss-newton", "empirical-fisher", "hessian")


class Diagonal(Curvature):
    """``C = diag(A)``: a diagonal of the curvature, inverted elementwise (see the module docstring).

    Args:
        matrix: ``"gauss-newton"`` (exact GGN diagonal, default; needs a task with ``outputs``),
            ``"empirical-fisher"`` (mean squared per-example gradient) or ``"hessian"`` (Hutchinson).
        damping: ``"auto"`` (0 unless an entry is negative, then ``0.01 * mean |d|``, as the dense routes) or a
            number ``>= 0``.
        negative: policy for negative entries (only the Hutchinson Hessian diagonal has them): ``"clip"``,
            ``"abs"`` or ``"keep"``.
        n_probes: Rademacher probes for ``matrix="hessian"``.
        random_state: seed of the probes.
    """

    name = "diagonal"

    def __init__(
        self,
        matrix: str = "gauss-newton",
        damping: float | str = "auto",
        negative: str = "clip",
        n_probes: int = 64,
        random_state: int = 0,
    ) -> None:
        super().__init__()
        self.matrix = check_choice("matrix", matrix, DIAGONALS)
        self.damping = check_damping(damping)
        self.negative = check_choice("negative", negative, NEGATIVE_POLICIES)
        self.n_probes = check_positive_int("n_probes", n_probes)
        self.random_state = check_random_state(random_state)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> Diagonal:
        source = as_data_source(data, "train")
        if self.matrix == "gauss-newton":
            require_outputs(
                fmodel, fix="define both methods on the task, or use matrix='empirical-fisher' or 'hessian'"
            )
            diag = ggn_diagonal(fmodel, source, progress)
        elif self.matrix == "empirical-fisher":
            diag = empirical_fisher_diagonal(fmodel, source, progress)
        else:
            diag = hutchinson_diagonal(fmodel, source, "hessian", self.n_probes, self.random_state, progress)
        check_finite(
            diag, f"the {self.matrix} diagonal", "Fix: check the model's outputs and loss for NaN/inf."
        )
        inv, damping, info = spectral_inverse(diag, self.damping, self.negative, None, self.name)
        self.remember_shape(fmodel)
        self.diagonal_ = diag
        self.inv_diagonal_ = inv
        self.damping_ = damping
        info.update({"matrix": self.matrix})
        if self.matrix == "hessian":
            info["n_probes"] = self.n_probes
        self.info_ = info
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        out = rows * self.inv_diagonal_
        return out[0] if one else out

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        out = rows * (self.diagonal_ + self.damping_)
        return out[0] if one else out

    def __repr__(self) -> str:
        return f"Diagonal(matrix={self.matrix!r}, damping={self.damping!r}, negative={self.negative!r})"


__all__ = ["DIAGONALS", "Diagonal"]
