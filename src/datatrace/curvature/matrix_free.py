"""The shared base of the matrix-free routes (:mod:`~datatrace.curvature.cg`, :mod:`~datatrace.curvature.lissa`,
:mod:`~datatrace.curvature.arnoldi`).

These routes never form the ``p x p`` matrix. They only need products ``A v`` with the curvature ``A`` of the
training objective (regulariser included), chosen with ``matrix=``: ``"hessian"`` (``A = H``) or
``"gauss-newton"`` (``A = G``, positive semi-definite for losses convex in the outputs, which is what an iterative
solver wants on a network); both products are in :mod:`datatrace.gradients.products`. All rows of ``solve(V)`` are
solved together: one product per step serves every right-hand side.

**Damping ``"auto"``.** CG and LiSSA need ``A + damping I`` positive definite; the dense routes' rule (0 for a
convex objective) would leave them ill-posed on the indefinite Hessian of a network. So ``"auto"`` first estimates
the spectrum with a short Lanczos run (:func:`datatrace.linalg.estimate_spectrum`, ``SPECTRUM_STEPS`` products
from a seeded random start) and then uses :func:`datatrace.linalg.positive_definite_damping`: 0 when no negative
curvature is found (the same answer as ``curvature="exact"`` with its own ``"auto"``), otherwise the smallest
shift that makes ``A + damping I`` positive definite plus the dense routes' Levenberg-Marquardt term. A short
Lanczos run finds the extreme eigenvalues first, so it can miss a few small negative ones next to a large positive
spectrum; CG then raises the damping itself when it meets them (:class:`~datatrace.curvature.cg.CG`). The
estimates are reported in ``info``.
"""

from __future__ import annotations

import torch

from datatrace import linalg
from datatrace.curvature.base import Curvature
from datatrace.data import DataLike, DataSource, as_data_source
from datatrace.gradients.functional import FunctionalModel
from datatrace.gradients.products import curvature_operator
from datatrace.linalg import SpectrumEstimate, estimate_spectrum


class MatrixFree(Curvature):
    """Shared parts of the matrix-free routes: fitted state, products, the spectrum estimate for ``"auto"``.

    Subclasses set ``random_state`` (the seed of the Lanczos start) and, in ``fit``, ``damping_``.
    """

    random_state: int = 0

    def bind(self, fmodel: FunctionalModel, data: DataLike, matrix: str) -> DataSource:
        """Keep the model, the training data and the product ``V -> A V``; return the data as a source."""
        source = as_data_source(data, "train")
        self.operator_ = curvature_operator(fmodel, source, matrix)
        self.remember_shape(fmodel)
        self.fmodel_ = fmodel
        self.data_ = source
        return source

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(A + damping I) v`` for each row, with the fitted operator and damping."""
        rows, one = self.rows(vectors)
        out = self.operator_(rows) + self.damping_ * rows
        return out[0] if one else out

    def spectrum(self, progress: bool) -> SpectrumEstimate:
        """The Lanczos estimate of the spectrum of ``A`` (``linalg.SPECTRUM_STEPS`` products)."""
        fmodel = self.fmodel_
        return estimate_spectrum(
            self.operator_,
            fmodel.num_params,
            linalg.SPECTRUM_STEPS,
            random_state=self.random_state,
            dtype=fmodel.dtype,
            device=fmodel.device,
            progress=progress,
        )


__all__ = ["MatrixFree"]
