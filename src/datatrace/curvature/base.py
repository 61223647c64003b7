"""The curvature interface every inverse-Hessian route implements.

A :class:`Curvature` is fitted once on the training data (``fit``) and then answers ``solve(V)``: for each row
``v`` of ``V`` (shape ``(m, p)``, in the flat parameter space of :class:`~datatrace.params.ParamSpace`) an
approximation of ``(C + damping * I)^{-1} v``, where ``C`` is the curvature of the training objective of
:mod:`datatrace.tasks` (the Hessian, or an approximation of it that includes the regulariser ``diag(lambda)``).

Routes never know about attributors or scores: they see a :class:`~datatrace.gradients.functional.FunctionalModel` (a model,
a task, the parameters in scope) and a :class:`~datatrace.data.DataSource`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from datatrace.data import DataSource
from datatrace.gradients.functional import FunctionalModel


class Curvature(ABC):
    """Base class of inverse-curvature routes. Constructors only store settings; ``fit`` does the work."""

    #: registry name, e.g. ``"exact"``
    name: str = ""
    #: True when ``solve`` itself passes over the training data (CG, LiSSA): under torch.distributed those passes
    #: are collectives, so every rank must then solve the same rows in the same order
    collective_solve: bool = False

    def __init__(self) -> None:
        self.info_: dict[str, Any] = {}

    @abstractmethod
    def fit(self, fmodel: FunctionalModel, data: DataSource, progress: bool = True) -> Curvature:
        """Compute what the route needs from the training data; return ``self``."""

    @abstractmethod
    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """Approximate ``(C + damping I)^{-1} v`` for each row of ``vectors`` (shape ``(m, p)``)."""

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C + damping I) v`` for each row, where the route can form it (used by tests and diagnostics)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its matrix-vector product.")

    @property
    def info(self) -> dict[str, Any]:
        """What the route did: damping used, eigenvalue statistics, iterations, ... (for reports and logs)."""
        return dict(self.info_)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
