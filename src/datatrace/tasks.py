"""Tasks: the one place where user code plugs into datatrace.

A :class:`Task` says how to compute the per-example training loss ``l(z, theta)`` and the measurement
``f(theta)`` of a query (by default the query's own loss), and which L2 term the model was trained with. The
training objective that every estimator in datatrace refers to is

    L(theta) = (1/n) * sum_i l(z_i, theta) + sum_b (lambda_b / 2) * ||theta_b||^2

where ``b`` runs over parameter tensors and ``lambda_b`` is ``weight_decay`` (one number for every parameter, or a
mapping from parameter name to its own strength). Its Hessian is therefore ``(1/n) sum_i d^2 l_i + diag(lambda)``.

A task that also splits the loss into ``outputs(model, batch)`` and ``loss_from_outputs(outputs, batch)`` unlocks
the Gauss-Newton curvature ``J^T (d^2 l / d outputs^2) J``; both built-in tasks do.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from datatrace.errors import bad_value


class Task:
    """Extension point: subclass and override :meth:`loss` (required) and :meth:`measurement` (optional).

    ``batch`` is a tuple of tensors as produced by the data (by default ``(x, y)``). Every method returns one
    value per example, shape ``(batch_size,)``.

    Args:
        weight_decay: the L2 strength ``lambda`` the model was trained with, as ``lambda/2 * ||theta||^2`` added
            to the *mean* loss (PyTorch's ``weight_decay=lambda`` in SGD is this). A float applies to every
            parameter in scope; a mapping ``{parameter name: lambda}`` applies per parameter (names not listed
            get 0, e.g. an unpenalised bias).

    Example:
        >>> class MyTask(Task):
        ...     def loss(self, model, batch):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    """

    def __init__(self, weight_decay: float | Mapping[str, float] = 0.0) -> None:
        if isinstance(weight_decay, Mapping):
            for key, value in weight_decay.items():
                if not isinstance(value, numbers.Real) or not 0.0 <= float(value) < math.inf:
                    raise bad_value(
                        f"weight_decay[{key!r}]",
                        value,
                        "expected a finite number >= 0",
                        "pass non-negative floats",
                    )
            self.weight_decay: float | dict[str, float] = {str(k): float(v) for k, v in weight_decay.items()}
        else:
            try:
                wd = float(weight_decay)
            except (TypeError, ValueError):
                raise bad_value(
                    "weight_decay", weight_decay, "expected a float or {name: float}", "pass e.g. 1e-3"
                ) from None
            if not 0.0 <= wd < math.inf:
                raise bad_value(
                    "weight_decay", weight_decay, "expected a finite number >= 0", "pass e.g. 1e-3 or 0"
                )
            self.weight_decay = wd

    # -- the required part -------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """Per-example training loss, shape ``(batch_size,)``. Defaults to ``loss_from_outputs(outputs(...))``."""
        if type(self).outputs is Task.outputs:
            raise NotImplementedError(
                f"{type(self).__name__} must define loss(model, batch) (or outputs and loss_from_outputs)."
            )
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def measurement(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """What a query measures, shape ``(batch_size,)``. Default: the query's own loss."""
        return self.loss(model, batch)

    # -- optional split, for Gauss-Newton curvature ------------------------------------------------------------
    def outputs(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """Model outputs the loss is a convex function of (e.g. logits), shape ``(batch_size, k)``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define outputs(model, batch) and loss_from_outputs(outputs, "
            "batch), which Gauss-Newton curvature needs. Fix: define both, or use curvature='exact'."
        )

    def loss_from_outputs(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        """Per-example loss as a function of :meth:`outputs`, shape ``(batch_size,)``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define loss_from_outputs(outputs, batch). "
            "Fix: define it, or use curvature='exact'."
        )

    @property
    def has_outputs(self) -> bool:
        return (
            type(self).outputs is not Task.outputs
            and type(self).loss_from_outputs is not Task.loss_from_outputs
        )

    def weight_decay_for(self, name: str) -> float:
        """The L2 strength ``lambda`` of parameter ``name``."""
        if isinstance(self.weight_decay, dict):
            return self.weight_decay.get(name, 0.0)
        return self.weight_decay

    def describe_measurement(self) -> str:
        """Words for what :meth:`measurement` returns, used in reports."""
        if type(self).measurement is Task.measurement:
            return "the query's loss"
        return f"{type(self).__name__}.measurement"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight_decay={self.weight_decay!r})"


def _first_input(batch: tuple) -> torch.Tensor:
    if len(batch) < 2:
        raise ValueError(
            f"batch has {len(batch)} element(s); the built-in tasks expect (inputs, targets). "
            "Fix: pass data as (X, y), or write a Task subclass for another layout."
        )
    return batch[0]


class ClassificationTask(Task):
    """Cross-entropy classification on ``(x, y)`` batches with integer labels ``y``.

    Outputs of shape ``(b, k)`` with ``k >= 2`` use softmax cross-entropy; outputs of shape ``(b,)`` or ``(b, 1)``
    are one logit per example and use the logistic loss with labels in {0, 1}.
    """

    def outputs(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        return model(_first_input(batch))

    def loss_from_outputs(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        y = batch[1]
        if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
            logits = outputs.reshape(-1)
            if logits.shape[0] != y.shape[0]:
                raise ValueError(
                    f"model returned {logits.shape[0]} logits for a batch of {y.shape[0]} labels. "
                    "Fix: the model must return one output row per example."
                )
            return F.binary_cross_entropy_with_logits(
                logits, y.to(logits.dtype).reshape(-1), reduction="none"
            )
        if outputs.dim() != 2:
            raise ValueError(
                f"ClassificationTask expects outputs of shape (batch, classes), got {tuple(outputs.shape)}. "
                "Fix: flatten the model's output or write a Task subclass."
            )
        if y.dtype.is_floating_point or y.dim() != 1:
            raise ValueError(
                f"ClassificationTask expects integer class labels of shape (batch,), got {y.dtype} "
                f"{tuple(y.shape)}. Fix: pass labels as a LongTensor of class indices."
            )
        if y.shape[0] != outputs.shape[0]:
            raise ValueError(
                f"model returned {outputs.shape[0]} rows for a batch of {y.shape[0]} labels. "
                "Fix: the model must return one output row per example."
            )
        return F.cross_entropy(outputs, y, reduction="none")


class RegressionTask(Task):
    """Squared error ``sum_k (f_k(x) - y_k)^2`` summed over outputs (no factor 1/2) on ``(x, y)`` batches."""

    def outputs(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        return model(_first_input(batch))

    def loss_from_outputs(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        y = batch[1].to(outputs.dtype)
        b = outputs.shape[0]
        out = outputs.reshape(b, -1)
        target = y.reshape(y.shape[0], -1)
        if target.shape != out.shape:
            raise ValueError(
                f"model outputs have shape {tuple(outputs.shape)} but targets have shape {tuple(y.shape)}: "
                "RegressionTask needs one target per output. Fix: reshape y to match the model's output."
            )
        return ((out - target) ** 2).sum(dim=1)
