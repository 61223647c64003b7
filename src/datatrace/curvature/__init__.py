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
``"auto"``         exact when it fits in memory, else EK-FAC, else CG; logs the choice (:class:`AutoCurvature`)
``"identity"``     H ~ I: gradient dot products, a baseline, not in leave-one-out units (:class:`Identity`)
=================  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datatrace.curvature.auto import AutoCurvature
from datatrace.curvature.base import Curvature
from datatrace.curvature.dense import DenseCurvature, ExactHessian, GaussNewton
from datatrace.curvature.iterative import CG, Arnoldi, LiSSA, ggn_vp
from datatrace.curvature.kfac import EKFAC, KFAC
from datatrace.curvature.simple import BlockDiagonal, Diagonal, Identity
from datatrace.errors import ConvergenceWarning, bad_value

#: name -> factory(damping=..., **options); matrix-free routes register with ``matrix_free=True``
_REGISTRY: dict[str, tuple[Callable[..., Curvature], bool]] = {}


def register(name: str, factory: Callable[..., Curvature], matrix_free: bool = False) -> None:
    """Make a route selectable as ``curvature=name``."""
    _REGISTRY[name] = (factory, matrix_free)


def available() -> list[str]:
    return sorted(_REGISTRY)


def matrix_free_names() -> list[str]:
    return sorted(n for n, (_, free) in _REGISTRY.items() if free)


def make_curvature(curvature: str | Curvature, damping: Any = "auto", **options: Any) -> Curvature:
    """A :class:`Curvature` from a registered name (with ``damping`` and options) or an instance as is."""
    if isinstance(curvature, Curvature):
        return curvature
    if not isinstance(curvature, str) or curvature not in _REGISTRY:
        raise bad_value(
            "curvature",
            curvature,
            f"expected a Curvature instance or one of {available()}",
            "pass one of those names, e.g. curvature='exact'",
        )
    factory, _ = _REGISTRY[curvature]
    return factory(damping=damping, **options)


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
