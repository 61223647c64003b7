"""Every projector name in one import: :mod:`datatrace.projection.random` (the :class:`Projector` interface and the
flat Johnson-Lindenstrauss :class:`RandomProjector`) and :mod:`datatrace.projection.factorized` (LoGra's per-layer
:class:`FactorizedProjector`), plus the output-space quantities the projected attributors ask of a task.
"""

from __future__ import annotations

import torch

from datatrace.projection.factorized import (
    FactorizedProjector,
    ProjectedLayer,
    find_layers,
    supports_factorized,
)
from datatrace.projection.random import (
    PROJECTION_KINDS,
    Projector,
    RandomProjector,
    derive_seed,
    jl_dim,
    random_matrix,
)
from datatrace.tasks import Task


def output_hessian_factors(task: Task, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``L_i`` with ``L_i L_i^T = d^2 l_i / d o^2``, shape ``(b, K, K)``: :meth:`~datatrace.Task.output_hessian_factors`."""
    return task.output_hessian_factors(outputs, batch)


def output_gradient(task: Task, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``dl_i / do_i``, shape ``(b, K)``: :meth:`~datatrace.Task.output_gradient`."""
    return task.output_gradient(outputs, batch)


__all__ = [
    "PROJECTION_KINDS",
    "FactorizedProjector",
    "ProjectedLayer",
    "Projector",
    "RandomProjector",
    "derive_seed",
    "find_layers",
    "jl_dim",
    "output_gradient",
    "output_hessian_factors",
    "random_matrix",
    "supports_factorized",
]
