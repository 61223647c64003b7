"""Tasks: the one place where user code plugs into datatrace.

A :class:`Task` says how to compute the per-example training loss ``l(z, theta)`` and the measurement
``f(theta)`` of a query (by default the query's own loss), and which L2 term the model was trained with. The
training objective that every estimator in datatrace refers to is

    L(theta) = (1/n) * sum_i l(z_i, theta) + sum_b (lambda_b / 2) * ||theta_b||^2

where ``b`` runs over parameter tensors and ``lambda_b`` is ``weight_decay`` (one number for every parameter, or a
mapping from parameter name to its own strength). Its Hessian is therefore ``(1/n) sum_i d^2 l_i + diag(lambda)``.

A task that also splits the loss into ``outputs(model, batch)`` and ``loss_from_outputs(outputs, batch)`` unlocks
the Gauss-Newton curvature ``J^T (d^2 l / d outputs^2) J``; both built-in tasks do. What the algorithms then ask of
the loss in the output space ``o`` is a task method, never a type check: :meth:`Task.output_gradient`
(``dl/do``), :meth:`Task.output_hessian_factors` (``L`` with ``L L^T = d^2 l / do^2``, the cotangents of the
Gauss-Newton pseudo-gradients ``J^T L[:, c]``, Martens & Grosse 2015) and :meth:`Task.sample_targets` (targets
drawn from the model's predictive distribution, for the sampled Fisher). ``Task`` computes the first two for any
loss with ``torch.func``; the built-in tasks override them (and sampling) with closed forms.

:meth:`Task.check_batch` sees every batch while its values are concrete, before any transform: the place for a
check on values (``ClassificationTask``: labels inside the model's classes), which ``vmap`` cannot branch on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from datatrace.data import map_batch, take_examples
from datatrace.errors import bad_value
from datatrace.linalg import zero_tolerance


def _decay(name: str, value: object) -> float:
    """A weight decay: a real number (not a bool, not a string), finite and ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad_value(
            name,
            value,
            "expected a number (a bool or a string would be read as a number by float(): True as 1.0)",
            "pass the L2 strength the model was trained with as a float, e.g. 1e-3, or 0",
        )
    out = float(value)
    if not 0.0 <= out < math.inf:
        raise bad_value(
            name, value, "expected a finite number >= 0", "pass e.g. 1e-3, or 0 for no weight decay"
        )
    return out


class Task:
    """Extension point: subclass and override :meth:`loss` (required) and :meth:`measurement` (optional).

    ``batch`` is a tuple of tensors as produced by the data (by default ``(x, y)``), or a dict of tensors for a
    Dataset of dicts (the Hugging Face form; :mod:`datatrace.hf` has tasks for it). Every method returns one
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
            self.weight_decay: float | dict[str, float] = {
                str(k): _decay(f"weight_decay[{k!r}]", v) for k, v in weight_decay.items()
            }
        else:
            self.weight_decay = _decay("weight_decay", weight_decay)

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

    # -- what algorithms ask of the loss in the output space -------------------------------------------------
    def output_gradient(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        """``dl_i / do_i`` for every example, shape ``(b, K)`` (``K`` outputs per example), by autograd."""
        o = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss_from_outputs(o, batch).sum(), o)
        return g.reshape(o.shape[0], -1)

    def output_hessian_factors(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        """``L_i`` with ``L_i L_i^T = d^2 l_i / d o^2`` for every example (negative curvature clipped to zero).

        Shape ``(b, K, K)``; column ``c`` of ``L_i`` is the output-space cotangent of the ``c``-th Gauss-Newton
        pseudo-gradient ``J_i^T L_i[:, c]``, so that ``sum_c (J_i^T L_ic)(J_i^T L_ic)^T = J_i^T H_i J_i``. This
        default differentiates :meth:`loss_from_outputs` twice with ``torch.func`` (reverse over reverse, per
        example) and eigendecomposes the ``K x K`` Hessian; eigenvalues within
        :func:`~datatrace.linalg.zero_tolerance` of zero (relative to the largest) count as zero.
        """
        shape = outputs.shape[1:]
        flat = outputs.detach().reshape(outputs.shape[0], -1)

        def single(o: torch.Tensor, example: tuple | dict) -> torch.Tensor:
            return self.loss_from_outputs(o.reshape(1, *shape), map_batch(lambda t: t.unsqueeze(0), example))[
                0
            ]

        hess = vmap(jacrev(jacrev(single)), in_dims=(0, 0))(flat, batch)
        hess = 0.5 * (hess + hess.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(hess)
        top = evals.abs().amax(dim=1, keepdim=True)
        tol = zero_tolerance(evals.shape[1], evals.dtype) * top
        evals = torch.where(evals > tol, evals, torch.zeros_like(evals))
        return evecs * evals.sqrt().unsqueeze(1)

    def output_counts(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        """How many of each example's outputs its loss depends on, shape ``(b,)``: the model outputs per example
        that ``damping="auto"`` counts (:class:`~datatrace.curvature.base.TrainingState`). Default: all of them,
        ``outputs[i].numel()``; a task whose outputs include positions without a loss (a language model's padding)
        counts only the others, so that padding does not change the damping."""
        return torch.full(
            (outputs.shape[0],), outputs[0].numel() if outputs.shape[0] else 0, dtype=torch.long
        )

    def position_mask(self, batch: tuple) -> torch.Tensor | None:
        """Which positions of each example are data, ``(b, T)`` (True: a real token), or ``None`` when every
        position of a layer's input is (the default: images, tabular rows). K-FAC's plain-mean input factor
        averages over the real positions only, so that padding changes nothing."""
        return None

    def distribution_counts(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        """How many predictive distributions each example's loss sums over, shape ``(b,)``: the targets a sampled
        Fisher draws per example (one per example here; a language model: one per counted position). K-FAC's
        ``damping="auto"`` with ``fisher="sampled"`` counts these as the curvature's outputs."""
        return torch.ones(outputs.shape[0], dtype=torch.long)

    def sample_targets(self, outputs: torch.Tensor, batch: tuple, generator: torch.Generator) -> tuple:
        """``batch`` with its targets drawn from the model's predictive distribution at ``outputs`` (the sampled
        Fisher), in the batch's own form (a tuple stays a tuple, a dict a dict: :func:`with_targets`). A custom
        task defines it to take part; the default raises."""
        raise bad_value(
            "fisher",
            "sampled",
            f"{type(self).__name__} does not say how to sample targets from the model's predictive distribution",
            "use fisher='ggn' (exact in the output space), or define task.sample_targets(outputs, batch, "
            "generator) returning the batch with sampled targets",
        )

    def check_batch(self, model: nn.Module, batch: tuple, indices: torch.Tensor | None = None) -> tuple:
        """Validate and normalise one concrete batch before any gradient is taken; returns the batch to use.

        Called on every batch by :meth:`FunctionalModel.prepare
        <datatrace.gradients.functional.FunctionalModel.prepare>`, where the values are still ordinary tensors:
        inside ``torch.func`` transforms (``vmap``) a task cannot branch on them, so a value check in
        :meth:`loss` could not raise there. ``indices`` (the batch's positions in its data set, when the caller
        knows them) let a message name the offending example. The default accepts every batch unchanged.
        """
        return batch

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


def targets_of(batch: tuple | Mapping, key: str = "labels") -> torch.Tensor:
    """The targets of a batch: ``batch[1]`` of a tuple ``(x, y, ...)``, ``batch[key]`` of a dict."""
    if isinstance(batch, Mapping):
        if key not in batch:
            raise bad_value(
                "target_key",
                key,
                f"the batch is a dict with keys {sorted(batch)}, none of them {key!r}",
                "name the key that holds the targets (e.g. target_key='labels')",
            )
        return batch[key]
    if len(batch) < 2:
        raise ValueError(
            f"batch has {len(batch)} element(s); the built-in tasks expect (inputs, targets). "
            "Fix: pass data as (X, y), or write a Task subclass for another layout."
        )
    return batch[1]


def with_targets(batch: tuple | Mapping, targets: torch.Tensor, key: str = "labels") -> tuple | dict:
    """``batch`` in its own form with its targets replaced (``batch[1]`` of a tuple, ``batch[key]`` of a dict):
    what :meth:`Task.sample_targets` returns."""
    if isinstance(batch, Mapping):
        return {**batch, key: targets}
    return (batch[0], targets, *batch[2:])


class _SupervisedTask(Task):
    """A loss on ``(x, y)``: tuple batches ``(x, y, ...)``, or dict batches read at ``input_key`` and
    ``target_key``.

    Args:
        weight_decay: as for :class:`Task`.
        input_key: for a data set of dicts, the key of the model's input (``model(batch[input_key])``); ``None``
            (default) reads tuple batches only.
        target_key: for a data set of dicts, the key of the targets (default ``"labels"``).
    """

    def __init__(
        self,
        weight_decay: float | Mapping[str, float] = 0.0,
        *,
        input_key: str | None = None,
        target_key: str = "labels",
    ) -> None:
        super().__init__(weight_decay)
        for name, key in (("input_key", input_key), ("target_key", target_key)):
            if key is not None and not isinstance(key, str):
                raise bad_value(
                    name, key, "expected a string (a key of the batch dicts)", f"pass e.g. {name}='x'"
                )
        if input_key is not None and input_key == target_key:
            raise bad_value(
                "target_key",
                target_key,
                f"the inputs are already read at input_key={input_key!r}",
                "use two keys",
            )
        self.input_key = input_key
        self.target_key = target_key

    def _reads_dicts(self) -> bool:
        """Whether the task knows where its dict batches keep the targets (``input_key`` given)."""
        return self.input_key is not None

    def _inputs(self, batch: tuple | Mapping) -> torch.Tensor:
        if isinstance(batch, Mapping):
            if self.input_key is None:
                raise bad_value(
                    "input_key",
                    None,
                    f"the batches are dicts with keys {sorted(batch)} (a Dataset that returns dicts) and "
                    f"{type(self).__name__} reads tuples (x, y) unless told which keys hold the inputs and targets",
                    f"pass {type(self).__name__}(input_key=..., target_key=...) naming the keys, use "
                    "datatrace.hf.SequenceClassificationTask / CausalLMTask for a Hugging Face model, or write a "
                    "Task whose loss reads the dict",
                )
            if self.input_key not in batch:
                raise bad_value(
                    "input_key",
                    self.input_key,
                    f"the batch is a dict with keys {sorted(batch)}",
                    "name the key that holds the model's input",
                )
            return batch[self.input_key]
        if len(batch) < 2:
            raise ValueError(
                f"batch has {len(batch)} element(s); the built-in tasks expect (inputs, targets). "
                "Fix: pass data as (X, y), or write a Task subclass for another layout."
            )
        return batch[0]

    def _targets(self, batch: tuple | Mapping) -> torch.Tensor:
        return targets_of(batch, self.target_key)

    def _with_targets(self, batch: tuple | Mapping, targets: torch.Tensor) -> tuple | dict:
        return with_targets(batch, targets, self.target_key)

    def outputs(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        out = model(self._inputs(batch))
        if not isinstance(out, torch.Tensor):
            hf = hasattr(out, "logits")
            raise bad_value(
                "model",
                f"a model returning {type(out).__name__}",
                f"{type(self).__name__} needs model(x) to return a tensor of outputs"
                + (
                    " (this looks like a Hugging Face ModelOutput, whose .logits are the outputs)"
                    if hf
                    else ""
                ),
                "use datatrace.hf.SequenceClassificationTask (it calls model(**batch) and reads .logits) with dict "
                "batches"
                if hf
                else "wrap the model so that it returns a tensor, or write a Task subclass",
            )
        return out

    def __repr__(self) -> str:
        keys = (
            f", input_key={self.input_key!r}, target_key={self.target_key!r}"
            if self.input_key is not None
            else ""
        )
        return f"{type(self).__name__}(weight_decay={self.weight_decay!r}{keys})"


class ClassificationTask(_SupervisedTask):
    """Cross-entropy classification on ``(x, y)`` batches with integer labels ``y`` (or dict batches read at
    ``input_key`` / ``target_key``, :class:`_SupervisedTask`).

    Outputs of shape ``(b, k)`` with ``k >= 2`` use softmax cross-entropy; outputs of shape ``(b,)`` or ``(b, 1)``
    are one logit per example and use the logistic loss with labels in {0, 1}. Labels of any integer dtype are
    read as int64, a column ``(b, 1)`` as ``(b,)``; :meth:`check_batch` refuses, naming the example, a label outside the model's classes (-100,
    cross-entropy's ``ignore_index``, included: drop unlabelled examples instead).
    """

    def loss_from_outputs(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        y = self._targets(batch)
        if not y.is_floating_point() and y.dtype != torch.long:
            y = y.long()  # int8/16/32, uint8, bool: the class indices cross-entropy wants, in its dtype
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

    def _own_loss(self) -> bool:
        """Whether the loss is this class's (a subclass that changes it gets the generic methods of Task)."""
        return type(self).loss_from_outputs is ClassificationTask.loss_from_outputs

    def check_batch(self, model: nn.Module, batch: tuple, indices: torch.Tensor | None = None) -> tuple:
        """Labels as int64 class indices inside the model's classes, or a ValueError naming the first bad one.

        With ``K`` logits the allowed labels are ``0 <= y < K``; with one logit (the logistic loss) they are 0
        and 1 (integers, or floats equal to 0.0 / 1.0). Integer labels of any width (and bools) become int64, and a
        column of labels ``(b, 1)`` becomes ``(b,)``; other shapes (one-hot rows) are refused.
        Refused: a label out of range (cross-entropy would raise, and the logistic loss would silently take
        ``y = 2`` as a target), a negative label, including -100 (cross-entropy's ``ignore_index``, whose example
        would silently get a zero loss and zero influence), and fractional labels. ``K`` is read from the model's
        output on one example, only when a label is above 1 or the labels are floats.
        """
        if not self._own_loss():
            return batch
        if isinstance(batch, Mapping):
            if not self._reads_dicts() or self.target_key not in batch:
                return batch  # loss_from_outputs / outputs explain what they cannot read
        elif not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return batch
        y = self._targets(batch)
        if not isinstance(y, torch.Tensor) or y.is_complex():
            return batch  # loss_from_outputs reports what it cannot use
        if not y.is_floating_point():
            y = y.long()
        if y.dim() > 1:
            if any(size != 1 for size in y.shape[1:]):
                raise ValueError(
                    f"labels of shape {tuple(y.shape)} ({y.dtype}): ClassificationTask takes one class index per "
                    "example, shape (batch,) or (batch, 1). Fix: for one-hot labels pass y.argmax(dim=1); for "
                    "soft or multi-label targets write a Task subclass with your own loss."
                )
            y = y.reshape(y.shape[0])  # a column of class indices, (batch, 1): the same labels as (batch,)
        if y.numel() == 0:
            return self._with_targets(batch, y)
        flat = y.reshape(-1)

        def where(bad: torch.Tensor) -> tuple[str, str]:
            pos = int(bad.nonzero()[0, 0])
            value = flat[pos].item()
            at = (
                f"example {int(indices[pos])}"
                if indices is not None and pos < len(indices)
                else f"position {pos}"
            )
            return f"{value:g}" if isinstance(value, float) else str(
                value
            ), f"{at} ({int(bad.sum())} bad in its batch)"

        negative = flat < 0
        if bool(negative.any()):
            value, at = where(negative)
            ignore = (
                " -100 is cross-entropy's ignore_index, which datatrace does not support (the example would silently "
                "count with zero loss and zero influence)."
                if bool((flat == -100).any())
                else ""
            )
            raise ValueError(
                f"label {value} at {at} is negative: ClassificationTask takes class indices 0 <= y < K (K = number "
                f"of logits; 0 or 1 for one logit).{ignore} Fix: drop the examples without a label (or with a "
                "negative one) from the data, or map labels to 0..K-1."
            )
        fractional = flat != flat.round() if y.is_floating_point() else None
        if fractional is not None and bool(fractional.any()):
            value, at = where(fractional)
            raise ValueError(
                f"label {value} at {at} is not a whole number: ClassificationTask takes class indices (soft labels "
                "are not supported). Fix: pass integer labels, or write a Task subclass with your own loss."
            )
        if not y.is_floating_point() and int(flat.max()) <= 1:
            return self._with_targets(batch, y)  # 0/1 labels are valid for any number of logits
        k = self._num_logits(model, batch)
        if k is None:
            return self._with_targets(batch, y)  # an output shape loss_from_outputs explains
        if y.is_floating_point() and k > 1:
            raise ValueError(
                f"ClassificationTask expects integer class labels for a model with {k} logits, got {y.dtype} "
                "labels. Fix: pass labels as a LongTensor of class indices (e.g. y.long())."
            )
        limit = 2 if k == 1 else k
        outside = flat >= limit
        if bool(outside.any()):
            value, at = where(outside)
            allowed = (
                "one logit (the logistic loss): labels 0 or 1" if k == 1 else f"{k} logits: labels 0..{k - 1}"
            )
            raise ValueError(
                f"label {value} at {at} is outside the model's classes: the model has {allowed}. Fix: check the "
                "labels, or give the model one output per class (with softmax cross-entropy for more than two)."
            )
        return self._with_targets(batch, y)

    def _num_logits(self, model: nn.Module, batch: tuple) -> int | None:
        """``K``, the number of logits per example, from the model's output on the batch's first example."""
        first = take_examples(batch, slice(0, 1))
        try:
            with torch.no_grad():
                out = self.outputs(model, first)
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None  # the loss computation meets the same failure, where it is reported with the batch
        if out.dim() == 1:
            return 1
        return int(out.shape[1]) if out.dim() == 2 else None

    def output_hessian_factors(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        """Closed forms: logistic ``L = sqrt(s (1 - s))``; softmax cross-entropy ``H = diag(p) - p p^T = L L^T``
        with ``L = diag(sqrt p) - p sqrt(p)^T``."""
        if not self._own_loss():
            return super().output_hessian_factors(outputs, batch)
        flat = outputs.detach().reshape(outputs.shape[0], -1)
        b, K = flat.shape
        if K == 1:
            s = torch.sigmoid(flat)
            return (s * (1 - s)).sqrt().reshape(b, 1, 1)
        p = torch.softmax(flat, dim=1)
        sq = p.sqrt()
        return torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]

    def sample_targets(self, outputs: torch.Tensor, batch: tuple, generator: torch.Generator) -> tuple:
        """Labels drawn from the softmax (categorical) or, for one logit, the sigmoid (Bernoulli)."""
        if not self._own_loss():
            return super().sample_targets(outputs, batch, generator)
        y = self._targets(batch)
        if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
            p = torch.sigmoid(outputs.reshape(-1))
            draw = torch.bernoulli(p, generator=generator)
            return self._with_targets(batch, draw.to(y.dtype).reshape(y.shape))
        probs = torch.softmax(outputs, dim=-1)
        draw = torch.multinomial(probs, 1, replacement=True, generator=generator).reshape(outputs.shape[0])
        return self._with_targets(batch, draw.to(y.dtype))


class RegressionTask(_SupervisedTask):
    """Squared error ``sum_k (f_k(x) - y_k)^2`` summed over outputs (no factor 1/2) on ``(x, y)`` batches (or
    dict batches read at ``input_key`` / ``target_key``)."""

    def loss_from_outputs(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        y = self._targets(batch).to(outputs.dtype)
        b = outputs.shape[0]
        out = outputs.reshape(b, -1)
        target = y.reshape(y.shape[0], -1)
        if target.shape != out.shape:
            raise ValueError(
                f"model outputs have shape {tuple(outputs.shape)} but targets have shape {tuple(y.shape)}: "
                "RegressionTask needs one target per output. Fix: reshape y to match the model's output."
            )
        return ((out - target) ** 2).sum(dim=1)

    def _own_loss(self) -> bool:
        """Whether the loss is this class's (a subclass that changes it gets the generic methods of Task)."""
        return type(self).loss_from_outputs is RegressionTask.loss_from_outputs

    def output_hessian_factors(self, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
        """Closed form: ``(o - y)^2`` summed has ``H = 2 I``, so ``L = sqrt(2) I``."""
        if not self._own_loss():
            return super().output_hessian_factors(outputs, batch)
        flat = outputs.detach().reshape(outputs.shape[0], -1)
        b, K = flat.shape
        eye = torch.eye(K, dtype=flat.dtype, device=flat.device)
        return (math.sqrt(2.0) * eye).expand(b, K, K)

    def sample_targets(self, outputs: torch.Tensor, batch: tuple, generator: torch.Generator) -> tuple:
        """Targets ``o + N(0, 1/2)``: the loss ``(o - y)^2`` is a Gaussian negative log-likelihood with variance 1/2."""
        if not self._own_loss():
            return super().sample_targets(outputs, batch, generator)
        y = self._targets(batch)
        flat = outputs.reshape(outputs.shape[0], -1)
        noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype, device=flat.device)
        return self._with_targets(batch, (flat + math.sqrt(0.5) * noise).reshape(y.shape))
