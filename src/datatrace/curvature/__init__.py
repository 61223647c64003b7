"""Inverse-curvature routes, selectable by name or passed as objects.

=================  ==========================================================================================
name               route
=================  ==========================================================================================
``"exact"``        dense Hessian of the training objective, eigendecomposed (:class:`ExactHessian`)
``"gauss-newton"`` dense generalised Gauss-Newton matrix plus the regulariser (:class:`GaussNewton`)
``"block-diagonal"`` a dense route per module (or per tensor), blocks eigendecomposed (:class:`BlockDiagonal`)
``"cg"``           conjugate gradient on Hessian- or Gauss-Newton-vector products (:class:`CG`)
``"lissa"``        stochastic Neumann series with a checked scale (:class:`LiSSA`)
``"arnoldi"``      top-k eigenpairs by Lanczos/Arnoldi, inverse on that subspace (:class:`Arnoldi`)
``"diagonal"``     diagonal of the Gauss-Newton, empirical Fisher or Hessian (:class:`Diagonal`)
``"kfac"``         Kronecker-factored Gauss-Newton/Fisher per Linear/Conv2d/Conv1D layer (:class:`KFAC`)
``"ekfac"``        K-FAC eigenbases with eigenvalues refitted per example (:class:`EKFAC`)
``"auto"``         the most accurate route within memory and time budget; logs why (:class:`AutoCurvature`)
``"identity"``     H ~ I: gradient dot products, a baseline, not in leave-one-out units (:class:`Identity`)
=================  ==========================================================================================

This package is the only place that imports the routes: it registers each under its name in
:mod:`datatrace.curvature.registry` (which imports no route, so routes can build other routes by name). The
kernels the routes compose live in :mod:`datatrace.linalg` (eigenvalue policy, Lanczos, CG, damping rules) and
:mod:`datatrace.gradients.products` (curvature-vector products and diagonals).
"""

from __future__ import annotations

from datatrace.curvature.arnoldi import Arnoldi
from datatrace.curvature.auto import AutoCurvature
from datatrace.curvature.base import Curvature
from datatrace.curvature.block_diagonal import BlockDiagonal
from datatrace.curvature.cg import CG
from datatrace.curvature.dense import DenseCurvature, ExactHessian, GaussNewton
from datatrace.curvature.diagonal import Diagonal
from datatrace.curvature.identity import Identity
from datatrace.curvature.kfac import EKFAC, KFAC
from datatrace.curvature.lissa import LiSSA
from datatrace.curvature.registry import available, make_curvature, matrix_free_names, register
from datatrace.errors import ConvergenceWarning
from datatrace.gradients.products import ggn_vp

register("exact", ExactHessian)
register("gauss-newton", GaussNewton)
register("block-diagonal", BlockDiagonal)
register("cg", CG, matrix_free=True)
register("lissa", LiSSA, matrix_free=True)
register("arnoldi", Arnoldi, matrix_free=True)
register("diagonal", Diagonal, matrix_free=True)
register("kfac", KFAC, matrix_free=True)
register("ekfac", EKFAC, matrix_free=True)
register("auto", AutoCurvature)
register("identity", Identity)  # a baseline (gradient dot products), not suggested as an alternative

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "AutoCurvature",
    "BlockDiagonal",
    "ConvergenceWarning",
    "Curvature",
    "DenseCurvature",
    "Diagonal",
    "ExactHessian",
    "GaussNewton",
    "Identity",
    "LiSSA",
    "available",
    "ggn_vp",
    "make_curvature",
    "matrix_free_names",
    "register",
]
