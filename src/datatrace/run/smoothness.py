"""Which operations make a recorded run's training map non-differentiable in the examples' data weights.

The metagradient (:mod:`datatrace.run.metagradient`) is the derivative of ``w -> f(theta_T(w))``. Each step moves
``theta`` by the gradient of the minibatch loss, and that gradient is a *discontinuous* function of ``theta``
wherever the model contains an operation whose derivative jumps: ReLU's derivative is the step ``1[z > 0]``,
max-pooling's derivative switches to another input when the arg-max changes. A reweighting of the training data,
however small, moves some pre-activation of some example across a kink in some step, and the update of that step
jumps by a finite amount. ``theta_T(w)`` is then differentiable only in a neighbourhood too small to matter: the
derivative is exact at ``w = 1`` (it matches finite differences at relative perturbations of 1e-6), but it
predicts the effect of a removal only as far as the jumps average out. With a smooth activation (GELU, tanh,
SiLU, softplus) the run is smooth and the derivative predicts removals closely (measured in
``benchmarks/README.md``, ``bench_metagradient.py``). This is the smoothness condition of Ilyas & Engstrom (2025,
"MAGIC", section on the limits of the method).

:func:`non_smooth_operations` finds such operations by running one forward pass under a
:class:`torch.overrides.TorchFunctionMode` that notes the functions called, so that functional calls
(``F.relu`` inside ``forward``) count as much as modules do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["NON_SMOOTH", "non_smooth_operations"]

#: functions whose derivative jumps (piecewise-linear activations, clamps used as activations, max-pooling)
NON_SMOOTH = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "leaky_relu",
        "leaky_relu_",
        "prelu",
        "rrelu",
        "rrelu_",
        "hardtanh",
        "hardtanh_",
        "hardswish",
        "hardsigmoid",
        "threshold",
        "threshold_",
        "hardshrink",
        "softshrink",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "adaptive_max_pool1d_with_indices",
        "adaptive_max_pool2d_with_indices",
        "adaptive_max_pool3d_with_indices",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
    }
)


class _CalledFunctions(TorchFunctionMode):
    """Notes the name of every torch function called inside."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


def non_smooth_operations(forward: Callable[[], Any]) -> list[str]:
    """The sorted names of the non-smooth functions (:data:`NON_SMOOTH`) that ``forward()`` calls."""
    mode = _CalledFunctions()
    with torch.no_grad(), mode:
        forward()
    return sorted(mode.names & NON_SMOOTH)
