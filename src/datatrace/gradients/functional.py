"""Gradients and curvature-vector products of a task, computed with ``torch.func``.

:class:`FunctionalModel` binds a model, a :class:`~datatrace.Task` and the parameters in scope, and exposes
functions of the flat parameter vector ``theta`` (see :mod:`datatrace.params`):

* ``per_example_grads(batch)``: the rows ``grad_theta l(z_i, theta)``, shape ``(b, p)`` (``vmap`` over ``grad``);
* ``per_example_measurement_grads(batch)``: the same for the task's measurement;
* ``objective_grad(data)``: ``grad L = (1/n) sum_i grad l_i + lambda * theta`` (zero at a minimum);
* ``hvp(v, data)``: ``H v`` for the objective's Hessian (forward-over-reverse, Pearlmutter 1994);
* ``dense_hessian(data)`` and ``dense_gauss_newton(data)``: the ``p x p`` matrices, for small models and tests.

Everything is computed with the module's other parameters and buffers fixed (``functional_call``), with the
model in eval mode (dropout off, batch-norm statistics frozen) so that influence refers to one deterministic
function of ``theta``.

Sums over the data (``objective_grad``, ``hvp``, ``dense_gauss_newton``) go through
:func:`datatrace.distributed.distributed_sum`: under an initialised ``torch.distributed`` process group each rank
sums over its own contiguous shard and the partial sums are all-reduced (the regulariser is added once, after the
reduction); in a single process it is the plain loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from datatrace.data import DataLike, DataSource, cast_batch
from datatrace.distributed import distributed_per_example, distributed_sum
from datatrace.errors import bad_value, is_out_of_memory
from datatrace.params import ParamSpace, select_parameters
from datatrace.tasks import Task


class BoundFunction(nn.Module):
    """Holds ``model`` as a submodule so that ``functional_call`` can swap its parameters inside ``fn``."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, tuple], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, batch)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def prepare_model(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A private copy of ``model`` in ``dtype`` (the user's model is never modified), in eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Fix: pass the trained network, or use datatrace.from_sklearn for a scikit-learn estimator."
        )
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone = clone.to(dtype)
    clone.eval()
    return clone


class FunctionalModel:
    """A model and task viewed as functions of the flat vector of in-scope parameters."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        params: str | list[str] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.model = model
        self.task = task
        if isinstance(task.weight_decay, dict):
            names = [n for n, _ in model.named_parameters()]
            unknown = sorted(set(task.weight_decay) - set(names))
            if unknown:
                raise ValueError(
                    f"weight_decay names {unknown}, which are not parameters of the model: allowed names are "
                    f"{names[:12]}{' ...' if len(names) > 12 else ''}. Fix: use the names of "
                    "model.named_parameters() (a misspelt name would silently get no weight decay)."
                )
        selected = select_parameters(model, params)
        self.space = ParamSpace.from_tensors(selected)
        self.theta = self.space.flatten({n: p.detach() for n, p in selected.items()})
        self.dtype = self.theta.dtype
        self.device = self.theta.device
        self.chunk_size = chunk_size
        self.loss_module = BoundFunction(model, task.loss)
        self.measurement_module = BoundFunction(model, task.measurement)
        self.regularizer = self.space.flatten(
            {
                n: torch.full(s, task.weight_decay_for(n), dtype=self.dtype)
                for n, s in zip(self.space.names, self.space.shapes)
            }
        ).to(self.device)

    @property
    def num_params(self) -> int:
        return self.space.numel

    # -- scalar functions of theta -----------------------------------------------------------------------------
    def call(self, module: nn.Module, theta: torch.Tensor, batch: tuple) -> torch.Tensor:
        named = {"model." + k: v for k, v in self.space.unflatten(theta).items()}
        return functional_call(module, named, batch)

    def losses(self, theta: torch.Tensor, batch: tuple) -> torch.Tensor:
        return self.call(self.loss_module, theta, batch)

    def measurements(self, theta: torch.Tensor, batch: tuple) -> torch.Tensor:
        return self.call(self.measurement_module, theta, batch)

    def prepare(self, batch: tuple) -> tuple:
        """``batch`` cast to the working dtype and device, then checked by the task (:meth:`Task.check_batch`)
        while its values are still concrete (the ``torch.func`` transforms cannot branch on them)."""
        return self.task.check_batch(self.model, cast_batch(batch, self.dtype, self.device))

    # -- per-example gradients ---------------------------------------------------------------------------------
    def _per_example(self, module: nn.Module, batch: tuple) -> torch.Tensor:
        def single(theta: torch.Tensor, *example: torch.Tensor) -> torch.Tensor:
            out = self.call(module, theta, tuple(t.unsqueeze(0) for t in example))
            if out.shape != (1,):
                raise ValueError(
                    f"the task returned shape {tuple(out.shape)} for a batch of one example; loss and "
                    "measurement must return one value per example, shape (batch_size,). "
                    "Fix: use reduction='none' and do not average over the batch."
                )
            return out[0]

        dims = (None, *tuple(0 for _ in batch))
        # detached: out-of-scope parameters may require grad, and no caller differentiates these rows again
        return vmap(grad(single), in_dims=dims, chunk_size=self.chunk_size)(self.theta, *batch).detach()

    def per_example_grads(self, batch: tuple) -> torch.Tensor:
        """``grad_theta l(z_i, theta_hat)`` for each example of ``batch``, shape ``(b, p)``."""
        return self._per_example(self.loss_module, self.prepare(batch))

    def per_example_measurement_grads(
        self, batch: tuple, measurement: Callable[[nn.Module, tuple], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``grad_theta f(z_q, theta_hat)`` for each query of ``batch``, shape ``(b, p)``.

        ``measurement(model, batch) -> (b,)`` replaces the task's own measurement when given.
        """
        module = self.measurement_module if measurement is None else BoundFunction(self.model, measurement)
        return self._per_example(module, self.prepare(batch))

    # -- the training objective --------------------------------------------------------------------------------
    def objective_grad(self, data: DataSource) -> torch.Tensor:
        """``grad L(theta_hat) = (1/n) sum_i grad l_i + lambda * theta_hat``; zero at a minimum."""
        n = len(data)

        def batch_grad(batch: tuple) -> torch.Tensor:
            b = self.prepare(batch)
            return grad(lambda t: self.losses(t, b).sum())(self.theta)

        total = distributed_sum(batch_grad, data, device=self.device, desc="objective gradient")
        return total / n + self.regularizer * self.theta

    def hvp(self, vectors: torch.Tensor, data: DataSource) -> torch.Tensor:
        """``H v`` for each row ``v`` of ``vectors`` (shape ``(m, p)``), H the Hessian of the objective."""
        n = len(data)
        vectors = vectors.to(self.dtype)

        def batch_hvp(batch: tuple) -> torch.Tensor:
            b = self.prepare(batch)
            g = grad(lambda t: self.losses(t, b).sum() / n)

            def column(v: torch.Tensor) -> torch.Tensor:
                return jvp(g, (self.theta,), (v,))[1]

            return vmap(column, chunk_size=self.chunk_size)(vectors)

        data_term = distributed_sum(batch_hvp, data, device=self.device, desc="Hessian-vector products")
        # detached: out-of-scope parameters may require grad; nothing differentiates H v again
        return (data_term + vectors * self.regularizer).detach()

    def dense_hessian(self, data: DataSource, progress: Callable | None = None) -> torch.Tensor:
        """The ``p x p`` Hessian of the training objective (data term plus regulariser)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        step = max(1, min(self.num_params, self.chunk_size or 256))
        blocks = []
        for start in range(0, self.num_params, step):
            blocks.append(self.hvp(eye[start : start + step], data))
            if progress is not None:
                progress(min(step, self.num_params - start))
        hessian = torch.cat(blocks, dim=0)
        return 0.5 * (hessian + hessian.T)

    def dense_gauss_newton(self, data: DataSource, progress: Callable | None = None) -> torch.Tensor:
        """``G = (1/n) sum_i J_i^T (d^2 l_i / d o^2) J_i + diag(lambda)``, with ``o = task.outputs``.

        The generalised Gauss-Newton matrix (Schraudolph 2002; Martens 2020): the Hessian with the second
        derivative of the outputs dropped. It is positive semi-definite whenever the loss is convex in the
        outputs (cross-entropy, squared error).
        """
        if not self.task.has_outputs:
            self.task.outputs(self.model, ())  # raises the task's own explanatory error
        n = len(data)
        out_module = BoundFunction(self.model, self.task.outputs)

        def single_out(theta: torch.Tensor, *example: torch.Tensor) -> torch.Tensor:
            return self.call(out_module, theta, tuple(t.unsqueeze(0) for t in example))[0].reshape(-1)

        def single_loss(o: torch.Tensor, shape: torch.Size, *example: torch.Tensor) -> torch.Tensor:
            batch = tuple(t.unsqueeze(0) for t in example)
            return self.task.loss_from_outputs(o.reshape(1, *shape), batch)[0]

        def batch_ggn(batch: tuple) -> torch.Tensor:
            b = self.prepare(batch)
            dims = (None, *tuple(0 for _ in b))
            jac = vmap(jacrev(single_out), in_dims=dims, chunk_size=self.chunk_size)(
                self.theta, *b
            )  # (b, k, p)
            with torch.no_grad():
                outs = self.call(out_module, self.theta, b)
            shape = outs.shape[1:]
            flat_out = outs.reshape(outs.shape[0], -1)
            hess_out = vmap(
                jacrev(jacrev(lambda o, *ex, shape=shape: single_loss(o, shape, *ex))),
                in_dims=(0, *tuple(0 for _ in b)),
            )(flat_out, *b)  # (b, k, k)
            if progress is not None:
                progress(len(b[0]))
            return torch.einsum("bkp,bkl,blq->pq", jac, hess_out, jac) / n

        ggn = distributed_sum(batch_ggn, data, device=self.device, desc="Gauss-Newton matrix")
        ggn = ggn + torch.diag(self.regularizer)
        return (0.5 * (ggn + ggn.T)).detach()


def check_model_and_task(
    model: Any,
    task: Any,
    dtype: Any = None,
    model_fix: str = "for scikit-learn estimators use datatrace.from_sklearn",
) -> None:
    """The checks every attributor's constructor makes: a Module, a datatrace Task, a floating dtype or None;
    ``model_fix`` is the hint given for a model that is not a Module."""
    if not isinstance(task, Task):
        raise bad_value(
            "task",
            task,
            "expected a datatrace.Task",
            "pass ClassificationTask(), RegressionTask() or a subclass",
        )
    if not isinstance(model, nn.Module):
        raise bad_value(
            "model",
            model,
            "expected a torch.nn.Module",
            model_fix,
        )
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise bad_value("dtype", dtype, "expected a floating torch dtype or None", "pass torch.float64")


def batch_failure(task: Task, what: str, batch: tuple, err: BaseException) -> ValueError:
    """The error for a task that failed on a batch: the shapes it got and what usually disagrees."""
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch]
    return ValueError(
        f"running {type(task).__name__} on a batch of {what} failed: {err}. The batch's elements have shapes "
        f"{shapes}. Fix: check that the model, the task and the data agree (input width, number of outputs, "
        "label type)."
    )


def memory_failure(what: str, batch: tuple, err: BaseException) -> MemoryError:
    """The error for running out of memory on a batch: a size problem, never reported as a data mismatch."""
    size = len(batch[0]) if batch and hasattr(batch[0], "__len__") else "?"
    return MemoryError(
        f"ran out of memory computing the per-example rows of a batch of {size} {what} examples: {err}. This is "
        "the machine's memory, not a problem with the data. Fix: lower batch_size (a batch holds batch_size x p "
        "gradient numbers and their intermediates), restrict the parameters with params=, or free memory."
    )


def check_rows_finite(
    rows: torch.Tensor, indices: torch.Tensor, describe: Callable[[int], str], fix: str
) -> None:
    """Raise a FloatingPointError naming the first example (``describe(index)``) whose row is not finite."""
    bad = ~torch.isfinite(rows).all(dim=1)
    if bool(bad.any()):
        first = int(indices[bad.nonzero()[0, 0]])
        raise FloatingPointError(
            f"the {describe(first)} is not finite ({int(bad.sum())} bad example(s) in its batch). Fix: {fix}"
        )


def checked_rows(
    fn: Callable[[tuple], torch.Tensor],
    task: Task,
    what: str,
    indices: torch.Tensor,
    batch: tuple,
    describe: Callable[[int], str],
    fix: str,
) -> torch.Tensor:
    """``fn(batch)``, the per-example rows of one batch, checked: a task that fails on the batch raises
    :func:`batch_failure` (naming ``what``), a non-finite row raises :func:`check_rows_finite` (naming
    ``describe(index)`` and ``fix``)."""
    try:
        rows = fn(batch)
    except (RuntimeError, IndexError, TypeError) as err:
        if is_out_of_memory(err):  # the machine, not the data: say so
            raise memory_failure(what, batch, err) from err
        raise batch_failure(task, what, batch, err) from err
    check_rows_finite(rows, indices, describe, fix)
    return rows


def per_example_rows(
    fn: Callable[[tuple], torch.Tensor],
    source: DataLike,
    task: Task,
    what: str,
    describe: Callable[[int], str],
    fix: str,
    *,
    progress: bool = False,
    desc: str = "per-example rows",
    batch_size: int | None = None,
    post: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The checked per-example loop every attributor uses: :func:`checked_rows` of every batch of ``source`` (then
    ``post`` of them, e.g. a projection), all rows in index order. Under torch.distributed each rank computes its
    shard and every rank gets all rows (:func:`datatrace.distributed.distributed_per_example`)."""

    def rows(idx: torch.Tensor, batch: tuple) -> torch.Tensor:
        g = checked_rows(fn, task, what, idx, batch, describe, fix)
        return g if post is None else post(g)

    return distributed_per_example(
        rows, source, batch_size=batch_size, with_indices=True, progress=progress, desc=desc
    )


def model_parameters_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.get_default_dtype()


__all__ = [
    "FunctionalModel",
    "batch_failure",
    "check_model_and_task",
    "check_rows_finite",
    "checked_rows",
    "eval_mode",
    "memory_failure",
    "model_parameters_dtype",
    "per_example_rows",
    "prepare_model",
]
