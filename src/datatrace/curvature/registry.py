"""Names of the inverse-curvature routes: ``curvature="exact"`` and friends.

A route registers a factory under a name (``register``); ``make_curvature`` builds it with ``damping`` and
options. This module imports no route: :mod:`datatrace.curvature` (the package) imports the routes and registers
them, so a route (``auto``, CG's preconditioners) can build another one by name without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datatrace.curvature.base import Curvature
from datatrace.errors import bad_value

#: name -> factory(damping=..., **options); matrix-free routes register with ``matrix_free=True``
_REGISTRY: dict[str, tuple[Callable[..., Curvature], bool]] = {}


def register(name: str, factory: Callable[..., Curvature], matrix_free: bool = False) -> None:
    """Make a route selectable as ``curvature=name``."""
    _REGISTRY[name] = (factory, matrix_free)


def available() -> list[str]:
    """The registered route names, sorted."""
    return sorted(_REGISTRY)


def matrix_free_names() -> list[str]:
    """The registered routes that never form the ``p x p`` matrix, sorted."""
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


__all__ = ["available", "make_curvature", "matrix_free_names", "register"]
