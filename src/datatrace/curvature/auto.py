"""``curvature="auto"``: the most accurate route the memory allows, chosen at ``fit`` time and logged.

The order is by accuracy measured in ``benchmarks/bench_curvature.py``:

1. the exact Hessian (dense, eigendecomposed in float64) when its ``p x p`` matrix fits in ``max_bytes``;
2. EK-FAC when every parameter in scope belongs to a layer it supports (Linear, Conv2d, Conv1D) and the batches
   are tuples (its sampled Fisher rebuilds batches element by element; a Dataset of dicts is not read that way);
3. otherwise conjugate gradient on Gauss-Newton-vector products, which needs no structure at all.

Models the default products cannot transform are handled below this level (:mod:`datatrace.gradients.functional`):
an attention layer without forward-mode AD gets double-backward Hessian-vector products, a recurrent layer that
``vmap`` cannot batch gets per-example loops, so every choice above stays available to them.

The chosen route is built by name through :mod:`datatrace.curvature.registry`; its ``info`` is reported with
``"auto_choice"`` and ``"auto_reason"`` added.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from datatrace.curvature.base import DEFAULT_MAX_DENSE_BYTES, Curvature
from datatrace.curvature.kfac import find_layers
from datatrace.curvature.registry import make_curvature
from datatrace.data import DataSource
from datatrace.errors import check_nonnegative_float, check_positive_int
from datatrace.gradients.functional import FunctionalModel

logger = logging.getLogger(__name__)


class AutoCurvature(Curvature):
    """Pick exact, EK-FAC or CG for the model at hand (see the module docstring)."""

    name = "auto"

    def __init__(self, damping: float | str = "auto", max_bytes: int = DEFAULT_MAX_DENSE_BYTES) -> None:
        super().__init__()
        if damping != "auto":
            damping = check_nonnegative_float("damping", damping)
        self.damping = damping
        self.max_bytes = check_positive_int("max_bytes", max_bytes)

    def __getattr__(self, name: str) -> Any:
        """Fitted attributes of the chosen route (``damping_``, ``evals_``, ...) read through ``auto``."""
        route = self.__dict__.get("route_")
        if route is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(route, name)

    def _choose(self, fmodel: FunctionalModel, data: DataSource) -> tuple[Curvature, str]:
        p = fmodel.num_params
        itemsize = torch.empty((), dtype=fmodel.dtype).element_size()
        need = 3 * p * p * itemsize
        if need <= self.max_bytes:
            reason = f"{p:,} parameters: the dense Hessian needs {need / 1024**3:.2f} GiB <= {self.max_bytes / 1024**3:.1f} GiB"
            return make_curvature("exact", damping=self.damping, max_bytes=self.max_bytes), reason
        try:
            if not fmodel.task.has_outputs:
                raise ValueError(f"{type(fmodel.task).__name__} has no outputs/loss_from_outputs split")
            find_layers(fmodel)
            if data.yields_mappings():
                raise ValueError("the batches are dicts, which EK-FAC's sampled Fisher does not read")
        except ValueError as err:  # a parameter outside the layers EK-FAC supports
            reason = (
                f"{p:,} parameters are too many for a dense matrix ({need / 1024**3:.1f} GiB) and EK-FAC cannot "
                f"cover them ({str(err).split('. Fix')[0]}): conjugate gradient on Gauss-Newton products"
            )
        else:
            reason = (
                f"{p:,} parameters are too many for a dense matrix ({need / 1024**3:.1f} GiB); every one is in "
                "a layer EK-FAC supports"
            )
            return make_curvature("ekfac", damping=self.damping), reason
        matrix = "gauss-newton" if fmodel.task.has_outputs else "hessian"
        return make_curvature("cg", matrix=matrix, damping=self.damping), reason

    def choose(self, fmodel: FunctionalModel, data: DataSource) -> tuple[Curvature, str]:
        """Choose the route for ``fmodel`` and ``data`` (no work beyond reading sizes) and keep the choice for
        :meth:`fit`; returns the unfitted route and the reason in words, so callers can say it before the work."""
        if getattr(self, "choice_", None) is None or self.choice_[0] is not fmodel:
            route, reason = self._choose(fmodel, data)
            logger.info("curvature='auto' chose %r: %s", route.name, reason)
            self.choice_ = (fmodel, route, reason)
        return self.choice_[1], self.choice_[2]

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> AutoCurvature:
        route, reason = self.choose(fmodel, data)
        route.training_state = self.training_state
        route.fit(fmodel, data, progress=progress)
        self.route_ = route
        self.info_ = {**route.info, "auto_choice": route.name, "auto_reason": reason}
        return self

    @property
    def collective_solve(self) -> bool:  # type: ignore[override]
        """The chosen route's (False before ``fit``)."""
        route = getattr(self, "route_", None)
        return bool(getattr(route, "collective_solve", False))

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        self.check_fitted("route_")
        return self.route_.solve(vectors)

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        self.check_fitted("route_")
        return self.route_.matvec(vectors)

    def __repr__(self) -> str:
        return f"AutoCurvature(damping={self.damping!r})"


__all__ = ["AutoCurvature"]
