"""``curvature="identity"``: ``C = I``, so scores become gradient dot products (a baseline).

``solve(v) = v / (1 + damping)``; influence scores become ``(1/n) grad f_q . g_i / (1 + damping)``, the
single-checkpoint TracIn / "gradient similarity" form (Pruthi et al. 2020). Not in leave-one-out units unless the
curvature really is the identity.
"""

from __future__ import annotations

import torch

from datatrace.curvature.base import Curvature, check_damping
from datatrace.data import DataSource
from datatrace.gradients.functional import FunctionalModel


class Identity(Curvature):
    """``C = I``: ``solve(v) = v / (1 + damping)``; influence scores become ``(1/n) grad f_q . g_i`` (damping 0).

    A baseline (gradient similarity, single-checkpoint TracIn with unit learning rate), not a leave-one-out
    estimate: it ignores curvature, so its numbers are off by the curvature's scale and direction. ``damping``
    ``"auto"`` is 0; a positive ``damping`` only rescales every score by ``1 / (1 + damping)``.
    """

    name = "identity"

    def __init__(self, damping: float | str = "auto") -> None:
        super().__init__()
        self.damping = check_damping(damping)

    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> Identity:
        self.remember_shape(fmodel)
        self.damping_ = 0.0 if self.damping == "auto" else float(self.damping)
        self.info_ = {"route": self.name, "num_params": fmodel.num_params, "damping": self.damping_}
        return self

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        out = rows / (1.0 + self.damping_)
        return out[0] if one else out

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, one = self.rows(vectors)
        out = rows * (1.0 + self.damping_)
        return out[0] if one else out

    def __repr__(self) -> str:
        return f"Identity(damping={self.damping!r})"


__all__ = ["Identity"]
