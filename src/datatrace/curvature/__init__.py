"""Inverse-curvature routes, selectable by name or passed as objects.

=================  ==========================================================================================
name               route
=================  ==========================================================================================
``"exact"``        dense Hessian of the training objective, eigendecomposed (:class:`ExactHessian`)
``"gauss-newton"`` dense generalised Gauss-Newton matrix plus the regulariser (:class:`GaussNewton`)
=================  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._validation import bad_value
from .base import Curvature
from .dense import DenseCurvature, ExactHessian, GaussNewton

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

__all__ = [
    "Curvature",
    "DenseCurvature",
    "ExactHessian",
    "GaussNewton",
    "available",
    "make_curvature",
    "matrix_free_names",
    "register",
]
