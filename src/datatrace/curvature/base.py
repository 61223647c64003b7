"""The curvature interface every inverse-Hessian route implements.

A :class:`Curvature` is fitted once on the training data (``fit``) and then answers ``solve(V)``: for each row
``v`` of ``V`` (shape ``(m, p)``, in the flat parameter space of :class:`~datatrace.params.ParamSpace`) an
approximation of ``(C + damping * I)^{-1} v``, where ``C`` is the curvature of the training objective of
:mod:`datatrace.tasks` (the Hessian, or an approximation of it that includes the regulariser ``diag(lambda)``).

Routes never know about attributors or scores: they see a :class:`~datatrace.gradients.functional.FunctionalModel` (a model,
a task, the parameters in scope) and a :class:`~datatrace.data.DataSource`. They compose the kernels of
:mod:`datatrace.linalg` with the products of :mod:`datatrace.gradients.products`.

The contract (checked for every registered route by ``tests/curvature/test_contract.py``): ``fit`` returns the
route; ``solve`` and ``matvec`` raise :class:`~datatrace.errors.NotFittedError` before ``fit``; where ``matvec``
exists, ``solve(matvec(v)) ~ v`` on the directions the route keeps; a zero row solves to a zero row; ``info``
holds at least ``route`` and ``damping`` (the damping actually used).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from datatrace.data import DataSource
from datatrace.errors import NotFittedError, bad_value, check_nonnegative_float, check_random_state
from datatrace.gradients.functional import FunctionalModel
from datatrace.linalg import DOF_PER_OUTPUT, as_rows

#: default budget for dense curvature: the p x p matrix plus its eigenvectors and workspace
DEFAULT_MAX_DENSE_BYTES = 4 * 1024**3
#: a model counts as at a minimum when ``||grad L|| <= AT_MINIMUM_RTOL * (mean per-example gradient norm)``
AT_MINIMUM_RTOL = 1e-3


@dataclass(frozen=True)
class TrainingState:
    """What an attributor learned about the trained model before fitting the curvature, for ``damping="auto"``.

    ``gradient_ratio`` is ``||grad L(theta_hat)|| / mean_i ||grad l_i||`` (0 at a stationary point; a model
    trained by Adam for a budget sits at a few percent); ``outputs`` is the number of model outputs per example
    (classes, or 1). At a minimum (ratio ``<= AT_MINIMUM_RTOL``) the influence function is the exact first-order
    answer and the routes' ``"auto"`` damping stays the minimal one (0 on a convex objective). Away from one the
    routes that know their spectrum keep :data:`~datatrace.linalg.DOF_PER_OUTPUT` effective directions per output
    (:func:`~datatrace.linalg.dof_damping`), at most half of the parameters.
    """

    gradient_ratio: float
    outputs: int = 1
    #: predictive distributions per example (1 for a classifier, the counted positions of a language model): the
    #: pseudo-gradient columns per example of a sampled Fisher with one draw per distribution
    distributions: int = 1

    @property
    def at_minimum(self) -> bool:
        return self.gradient_ratio <= AT_MINIMUM_RTOL

    def dof_target(
        self,
        num_params: int,
        per_output: float = DOF_PER_OUTPUT,
        outputs: int | None = None,
        max_fraction: float = 0.5,
    ) -> float | None:
        """The effective directions ``damping="auto"`` keeps (``per_output`` per model output, or per ``outputs``
        when given, at most ``max_fraction`` of the parameters), or None at a minimum (the minimal damping)."""
        if self.at_minimum:
            return None
        count = self.outputs if outputs is None else outputs
        return float(min(per_output * max(count, 1), num_params * max_fraction))


class Curvature(ABC):
    """Base class of inverse-curvature routes. Constructors only store settings; ``fit`` does the work."""

    #: registry name, e.g. ``"exact"``
    name: str = ""
    #: True when ``solve`` itself passes over the training data (CG, LiSSA): under torch.distributed those passes
    #: are collectives, so every rank must then solve the same rows in the same order
    collective_solve: bool = False
    #: True when the route covers only the layers of :mod:`datatrace.capture.kinds` (K-FAC, EK-FAC): with the
    #: default scope the attributor then narrows it to them (:mod:`datatrace.capture.scope`)
    layers_only: bool = False
    #: set by the attributor before ``fit`` (:class:`TrainingState`); None, for a route fitted on its own, is read
    #: as "at a minimum"
    training_state: TrainingState | None = None

    def __init__(self) -> None:
        self.info_: dict[str, Any] = {}

    def dof_target(self, num_params: int, per_output: float = DOF_PER_OUTPUT) -> float | None:
        """The effective directions ``damping="auto"`` keeps (:meth:`TrainingState.dof_target`), None at a
        minimum or when no attributor said."""
        if self.training_state is None:
            return None
        return self.training_state.dof_target(num_params, per_output)

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

    # -- helpers for routes ----------------------------------------------------------------------------------
    def check_fitted(self, attribute: str = "num_params_") -> None:
        """Raise :class:`NotFittedError` unless ``fit`` has set ``attribute``."""
        if not hasattr(self, attribute):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet. Fix: call .fit(fmodel, data) first, or pass it "
                "to InfluenceFunction(curvature=...) which fits it."
            )

    def remember_shape(self, fmodel: FunctionalModel) -> None:
        """Keep the size, dtype and device of the flat parameter space (:meth:`rows` checks against them)."""
        self.num_params_ = fmodel.num_params
        self.dtype_ = fmodel.dtype
        self.device_ = fmodel.device

    def rows(self, vectors: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``vectors`` checked and as ``(m, p)`` rows in the fitted dtype and device; the flag says whether
        they came as one 1-D vector (:func:`datatrace.linalg.as_rows`). :class:`NotFittedError` before ``fit``."""
        self.check_fitted()
        return as_rows(vectors, self.num_params_, self.dtype_, self.device_)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: examples (one forward pass each) whose output counts :func:`output_size` averages
OUTPUT_SIZE_EXAMPLES = 8


def output_size(fmodel: FunctionalModel, data: DataSource) -> int:
    """The number of model outputs per example that the loss depends on (:meth:`Task.output_counts
    <datatrace.Task.output_counts>`: all of ``task.outputs`` for a classifier, the ``V`` logits of every counted
    position for a language model, so that padding changes nothing), the rounded mean over the first
    :data:`OUTPUT_SIZE_EXAMPLES` examples, at least 1; 1 without outputs."""
    return output_sizes(fmodel, data)[0]


def distribution_size(fmodel: FunctionalModel, data: DataSource) -> int:
    """The number of predictive distributions per example (:meth:`Task.distribution_counts
    <datatrace.Task.distribution_counts>`: 1 for a classifier, the counted positions of a language model), the
    rounded mean over the first :data:`OUTPUT_SIZE_EXAMPLES` examples, at least 1; 1 without outputs."""
    return output_sizes(fmodel, data)[1]


def output_sizes(fmodel: FunctionalModel, data: DataSource) -> tuple[int, int]:
    """:func:`output_size` and :func:`distribution_size` from the same forward passes."""
    if not fmodel.task.has_outputs or len(data) == 0:
        return 1, 1
    counts: list[tuple[float, float]] = []
    task = fmodel.task
    with torch.no_grad():
        for _, batch in data.batches(batch_size=1):
            batch = fmodel.prepare(batch)
            outputs = task.outputs(fmodel.model, batch)
            counts.append(
                (
                    float(task.output_counts(outputs, batch).sum()),
                    float(task.distribution_counts(outputs, batch).sum()),
                )
            )
            if len(counts) == OUTPUT_SIZE_EXAMPLES:
                break
    return tuple(max(1, round(sum(c[k] for c in counts) / len(counts))) for k in range(2))  # type: ignore[return-value]


# -- settings checks shared by the routes ----------------------------------------------------------------------------
def check_damping(damping: Any) -> float | str:
    """``"auto"`` or a number ``>= 0``, with the project's error message otherwise."""
    if damping == "auto":
        return "auto"
    if isinstance(damping, str):
        raise bad_value("damping", damping, "expected 'auto' or a number >= 0", "pass damping='auto' or 1e-3")
    return check_nonnegative_float("damping", damping)


def check_rtol(rtol: Any) -> float | None:
    """``None`` (the default tolerance, :func:`datatrace.linalg.zero_tolerance`) or a relative tolerance in
    ``[0, 1)``, with the project's error message otherwise."""
    if rtol is None:
        return None
    value = check_nonnegative_float("rtol", rtol)
    if value >= 1:
        raise bad_value(
            "rtol", rtol, "expected a relative tolerance in [0, 1)", "pass e.g. rtol=1e-10 or None"
        )
    return value


def format_bytes(size: float) -> str:
    """``23064`` -> ``'22.5 KiB'``: a size in the largest binary unit that keeps it >= 1."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "Curvature",
    "check_damping",
    "check_random_state",
    "check_rtol",
    "format_bytes",
]
