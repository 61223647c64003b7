"""Gradients and curvature-vector products of a task, computed with ``torch.func``.

:class:`FunctionalModel` binds a model, a :class:`~datatrace.Task` and the parameters in scope, and exposes
functions of the flat parameter vector ``theta`` (see :mod:`datatrace.params`):

* ``per_example_grads(batch)``: the rows ``grad_theta l(z_i, theta)``, shape ``(b, p)`` (``vmap`` over ``grad``);
* ``per_example_measurement_grads(batch)``: the same for the task's measurement;
* ``objective_grad(data)``: ``grad L = (1/n) sum_i grad l_i + lambda * theta`` (zero at a minimum);
* ``hvp(v, data)``: ``H v`` for the objective's Hessian (forward-over-reverse, Pearlmutter 1994);
* ``dense_hessian(data)`` and ``dense_gauss_newton(data)``: the ``p x p`` matrices, for small models and tests.

Two fallbacks keep models that ``torch.func`` cannot fully transform traceable, each chosen on the first failure,
remembered by the object and logged once with the reason:

* **per-example loop.** ``vmap`` over examples fails for models whose code writes in place into unbatched
  tensors (``nn.LSTM``/``GRU``/``RNN`` on CPU) or branches on data; every per-example quantity
  (:meth:`FunctionalModel.over_examples`) is then computed one example at a time, which gives the same rows.
* **double backward.** Forward-mode AD is missing for some kernels (the fused CPU attention of
  ``F.scaled_dot_product_attention``, hence ``nn.MultiheadAttention``); ``H v`` is then the reverse-over-reverse
  product ``d/dtheta (grad L . v)`` (Pearlmutter 1994, the same matrix), computed with the reference kernels
  (attention's "math" kernel; recurrent layers without cuDNN), whose operations all have second derivatives
  (:func:`second_order_kernels`). The per-example loop runs with them too.

Everything is computed with the module's other parameters and buffers fixed (``functional_call``), with the
model in eval mode (dropout off, batch-norm statistics frozen) so that influence refers to one deterministic
function of ``theta``.

Sums over the data (``objective_grad``, ``hvp``, ``dense_gauss_newton``) go through
:func:`datatrace.distributed.distributed_sum`: under an initialised ``torch.distributed`` process group each rank
sums over its own contiguous shard and the partial sums are all-reduced (the regulariser is added once, after the
reduction); in a single process it is the plain loop.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from datatrace.data import DataLike, DataSource, batch_length, cast_batch, map_batch, take_examples
from datatrace.distributed import distributed_per_example, distributed_sum
from datatrace.errors import bad_value, is_out_of_memory
from datatrace.params import ParamSpace, select_parameters
from datatrace.tasks import Task

try:  # torch >= 2.3: choose the attention kernel
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch has no fused CPU attention to avoid
    SDPBackend = sdpa_kernel = None

logger = logging.getLogger(__name__)

#: the memory one per-example gradient pass may take for its gradient-sized tensors (the rows, and the copies that
#: ``vmap`` over ``grad`` makes of parameters, gradients and activations), and how many such copies one example
#: counts for; a batch larger than that is split (a 22M-parameter BERT: 3 examples at a time in float64, 6 in
#: float32)
PER_EXAMPLE_BYTES = 2 * 1024**3
PER_EXAMPLE_COPIES = 4
#: dtypes refused as the working dtype: half precision cannot carry scores of order 1/n, and torch.linalg has no
#: eigendecomposition or Cholesky factorisation for them
HALF_DTYPES = (torch.float16, torch.bfloat16)


def second_order_kernels() -> contextlib.AbstractContextManager:
    """A context in which the reference kernels run: ``F.scaled_dot_product_attention``'s "math" kernel, and
    recurrent layers without cuDNN.

    The fused attention kernels (flash attention on CPU) have neither forward-mode AD nor a double backward, and
    cuDNN's RNN has no double backward (nor a backward in eval mode); the reference kernels are composed of
    ordinary differentiable operations, so both exist. The result is the same function. (The cuDNN part only
    matters on a GPU.)
    """
    stack = contextlib.ExitStack()
    if sdpa_kernel is not None:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    stack.enter_context(torch.backends.cudnn.flags(enabled=False))
    return stack


def check_working_dtype(dtype: torch.dtype, explicit: bool = True) -> None:
    """Refuse half precision (float16, bfloat16) as the dtype influence is computed in: ``dtype=...`` when
    ``explicit``, else ``dtype=None`` (keep the model's own dtype) on a half-precision model."""
    if dtype in HALF_DTYPES:
        raise bad_value(
            "dtype",
            dtype if explicit else None,
            f"influence would be computed in {dtype}{'' if explicit else ', the dtype of the model'}: half "
            "precision cannot resolve scores of order 1/n and torch.linalg has no eigendecomposition or Cholesky "
            "factorisation for it",
            "pass dtype=torch.float64 (the default; the model is copied, yours is not changed) or torch.float32",
        )


#: examples of the first batch whose per-example gradients from layer hooks are checked against one-at-a-time rows
LAYER_ROWS_CHECKED = 4


class BoundFunction(nn.Module):
    """Holds ``model`` as a submodule so that ``functional_call`` can swap its parameters inside ``fn``."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, tuple], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: tuple | dict) -> torch.Tensor:
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
    if model.training:
        logger.info(
            "%s was passed in train mode; influence works on a private copy in eval mode (dropout off, BatchNorm's "
            "running statistics), the objective a trained model is used with. Your model is not changed.",
            type(model).__name__,
        )
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
        #: True when the user did not choose the parameters (``params=None``: every trainable one), so a route
        #: that covers only some layers may narrow the scope (:mod:`datatrace.capture.scope`)
        self.default_scope = params is None
        self.space = ParamSpace.from_tensors(selected)
        self.theta = self.space.flatten({n: p.detach() for n, p in selected.items()})
        #: the trainable parameters out of scope, detached: constants of every function of ``theta`` (left
        #: requiring grad, some kernels fail inside ``torch.func.grad``: ``nn.EmbeddingBag`` raises "Autograd not
        #: support dtype: Long" when a route narrows the scope to the layers it supports)
        self.fixed = {
            "model." + n: p.detach()
            for n, p in model.named_parameters()
            if p.requires_grad and n not in selected
        }
        self.dtype = self.theta.dtype
        check_working_dtype(self.dtype, explicit=False)
        self.device = self.theta.device
        self.chunk_size = chunk_size
        #: False once ``vmap`` over examples failed for this model: per-example work loops over examples
        self.vmap_examples = True
        #: ``(module, batch) -> (b, p)`` per-example gradients from layer hooks, set by an attributor when every
        #: parameter in scope belongs to a supported layer (:func:`datatrace.capture.engine.per_example_gradients`):
        #: used instead of the one-example-at-a-time loop once ``vmap`` failed, after agreeing with the loop's
        #: rows on one batch
        self.layer_rows: Callable[[nn.Module, tuple | dict], torch.Tensor] | None = None
        self._layer_rows_checked = False
        self._vmap_probed = False
        self._split_logged = False
        #: "forward-over-reverse", or "reverse-over-reverse" once forward-mode AD failed for this model
        self.hvp_mode = "forward-over-reverse"
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
    def call(self, module: nn.Module, theta: torch.Tensor, batch: tuple | dict) -> torch.Tensor:
        named = {**self.fixed, **{"model." + k: v for k, v in self.space.unflatten(theta).items()}}
        return functional_call(module, named, (batch,))

    def losses(self, theta: torch.Tensor, batch: tuple | dict) -> torch.Tensor:
        return self.call(self.loss_module, theta, batch)

    def measurements(self, theta: torch.Tensor, batch: tuple | dict) -> torch.Tensor:
        return self.call(self.measurement_module, theta, batch)

    def prepare(self, batch: tuple | dict, indices: torch.Tensor | None = None) -> tuple | dict:
        """``batch`` cast to the working dtype and device, then checked by the task (:meth:`Task.check_batch`)
        while its values are still concrete (the ``torch.func`` transforms cannot branch on them); ``indices``, the
        batch's positions in its data set when known, let a message name the offending example."""
        return self.task.check_batch(self.model, cast_batch(batch, self.dtype, self.device), indices)

    # -- per-example gradients ---------------------------------------------------------------------------------
    def over_examples(self, fn: Callable[..., torch.Tensor], shared: tuple, batched: tuple) -> torch.Tensor:
        """``fn(*shared, *(t[i] for t in batched))`` stacked over the examples ``i``; an element of ``batched``
        may be a whole batch (tuple or dict), sliced leaf by leaf.

        ``vmap`` while it works; the first time it fails for this model (an operation without a batching rule, an
        in-place write into an unbatched tensor as in ``nn.LSTM``, data-dependent control flow) the same rows are
        computed one example at a time, and from then on, with the reason logged once. If the loop fails too,
        its error (the model's or task's own) is raised.
        """
        if self.vmap_examples:
            dims = (*(None for _ in shared), *(0 for _ in batched))
            try:
                return vmap(fn, in_dims=dims, chunk_size=self.chunk_size)(*shared, *batched)
            except RuntimeError as err:
                if is_out_of_memory(err):  # memory, not a transform the model lacks
                    raise
                # the loop raises the model's (or task's) own error if it fails too
                rows = self._loop_examples(fn, shared, batched)
                self.vmap_examples = False
                logger.info(
                    "vmap cannot batch %s over examples (%s); computing per-example quantities one example at "
                    "a time from now on (same values, slower).",
                    type(self.model).__name__,
                    str(err).splitlines()[0] if str(err) else type(err).__name__,
                )
                return rows
        return self._loop_examples(fn, shared, batched)

    @staticmethod
    def _loop_examples(fn: Callable[..., torch.Tensor], shared: tuple, batched: tuple) -> torch.Tensor:
        count = batch_length(batched)
        with second_order_kernels():  # cuDNN's RNN has no backward in eval mode
            return torch.stack([fn(*shared, *take_examples(batched, i)) for i in range(count)])

    def _per_example(self, module: nn.Module, batch: tuple | dict) -> torch.Tensor:
        single = self._single(module)
        if self.layer_rows is not None and self.vmap_examples and not self._vmap_probed:
            # one example first: if vmap fails on this model, the hooks take the batch instead of the loop
            self._vmap_probed = True
            self.over_examples(grad(single), (self.theta,), (take_examples(batch, slice(0, 1)),))
        if not self.vmap_examples and self.layer_rows_agree(batch, module) and self.layer_rows is not None:
            return self.layer_rows(module, batch).detach()
        # detached: out-of-scope parameters may require grad, and no caller differentiates these rows again
        count, step = batch_length(batch), self.rows_per_pass()
        if count <= step:
            return self.over_examples(grad(single), (self.theta,), (batch,)).detach()
        if not self._split_logged:
            self._split_logged = True
            logger.info(
                "per-example gradients of %d parameters: %d examples at a time (about %.2g GiB of gradient copies "
                "each pass; PER_EXAMPLE_BYTES = %.2g GiB), not the batch of %d at once.",
                self.num_params,
                step,
                step * PER_EXAMPLE_COPIES * self.num_params * self.theta.element_size() / 2**30,
                PER_EXAMPLE_BYTES / 2**30,
                count,
            )
        parts = [
            self.over_examples(
                grad(single), (self.theta,), (take_examples(batch, slice(s, s + step)),)
            ).detach()
            for s in range(0, count, step)
        ]
        return torch.cat(parts)

    def _single(self, module: nn.Module) -> Callable[[torch.Tensor, tuple | dict], torch.Tensor]:
        """``theta, example -> module(one-example batch)``: the scalar whose gradient is a per-example row."""

        def single(theta: torch.Tensor, example: tuple | dict) -> torch.Tensor:
            out = self.call(module, theta, map_batch(lambda t: t.unsqueeze(0), example))
            if out.shape != (1,):
                raise ValueError(
                    f"the task returned shape {tuple(out.shape)} for a batch of one example; loss and "
                    "measurement must return one value per example, shape (batch_size,). "
                    "Fix: use reduction='none' and do not average over the batch."
                )
            return out[0]

        return single

    def layer_rows_agree(self, batch: tuple | dict, module: nn.Module | None = None) -> bool:
        """Whether :attr:`layer_rows` give the per-example gradients (of ``module``, default the loss): checked
        once, on the first :data:`LAYER_ROWS_CHECKED` examples of a prepared ``batch``, against ``vmap`` or the
        one-at-a-time loop. They differ when examples interact, a weight is used outside its module's forward or
        an input is not batch-first; then the hooks are switched off for good, with the reason logged."""
        if self.layer_rows is None:
            return False
        if self._layer_rows_checked:
            return True
        module = self.loss_module if module is None else module
        head = take_examples(batch, slice(0, min(batch_length(batch), LAYER_ROWS_CHECKED)))
        reference = self.over_examples(grad(self._single(module)), (self.theta,), (head,)).detach()
        try:
            hooked = self.layer_rows(module, head).detach()
        except ValueError as err:  # a supported layer whose input is not batch-first
            reason = str(err)
        else:
            error = float((hooked - reference).norm()) / max(float(reference.norm()), 1e-300)
            if error <= min(0.1, max(1e-10, 1e3 * torch.finfo(self.dtype).eps)):
                self._layer_rows_checked = True
                logger.info(
                    "per-example gradients of %s from the layers' hooks, a batch at a time (checked against "
                    "per-example autograd: relative difference %.2g).",
                    type(self.model).__name__,
                    error,
                )
                return True
            reason = (
                f"relative error {error:.3g}: examples that interact, or a weight used outside its module"
            )
        logger.info("per-example gradients: the layers' hooks differ from per-example autograd (%s).", reason)
        self.layer_rows = None
        return False

    def rows_per_pass(self) -> int:
        """Examples whose per-example gradients are computed together: as many as keep
        :data:`PER_EXAMPLE_COPIES` gradient-sized tensors per example within :data:`PER_EXAMPLE_BYTES`."""
        per_example = PER_EXAMPLE_COPIES * self.num_params * self.theta.element_size()
        return max(1, PER_EXAMPLE_BYTES // per_example)

    def per_example_grads(self, batch: tuple | dict) -> torch.Tensor:
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

        def batch_grad(batch: tuple | dict) -> torch.Tensor:
            b = self.prepare(batch)
            return grad(lambda t: self.losses(t, b).sum())(self.theta)

        total = distributed_sum(batch_grad, data, device=self.device, desc="objective gradient")
        return total / n + self.regularizer * self.theta

    def hvp(self, vectors: torch.Tensor, data: DataSource) -> torch.Tensor:
        """``H v`` for each row ``v`` of ``vectors`` (shape ``(m, p)``), H the Hessian of the objective.

        Forward-over-reverse (a JVP of the gradient, vmapped over the rows); where forward-mode AD is missing for
        an operation of the model, double backward instead (see the module docstring), remembered and logged once.
        """
        n = len(data)
        vectors = vectors.to(self.dtype)

        def batch_hvp(batch: tuple | dict) -> torch.Tensor:
            b = self.prepare(batch)
            if self.hvp_mode == "forward-over-reverse":
                try:
                    return self._hvp_forward(vectors, b, n)
                except RuntimeError as err:
                    if is_out_of_memory(err):  # memory, not a transform the model lacks
                        raise
                    first = str(err).splitlines()[0] if str(err) else type(err).__name__
                    rows = self._hvp_reverse(vectors, b, n, first)
                    self.hvp_mode = "reverse-over-reverse"
                    logger.info(
                        "forward-mode AD fails for %s (%s); Hessian-vector products use double backward "
                        "(reverse-over-reverse, the same matrix) from now on.",
                        type(self.model).__name__,
                        first,
                    )
                    return rows
            return self._hvp_reverse(vectors, b, n)

        data_term = distributed_sum(batch_hvp, data, device=self.device, desc="Hessian-vector products")
        # detached: out-of-scope parameters may require grad; nothing differentiates H v again
        return (data_term + vectors * self.regularizer).detach()

    def _hvp_forward(self, vectors: torch.Tensor, b: tuple, n: int) -> torch.Tensor:
        g = grad(lambda t: self.losses(t, b).sum() / n)

        def column(v: torch.Tensor) -> torch.Tensor:
            return jvp(g, (self.theta,), (v,))[1]

        return vmap(column, chunk_size=self.chunk_size)(vectors)

    def _hvp_reverse(self, vectors: torch.Tensor, b: tuple, n: int, forward_error: str = "") -> torch.Tensor:
        """``d/dtheta (grad(theta) . v)`` per row by plain autograd: one gradient graph, one backward per row."""
        try:
            with second_order_kernels(), torch.enable_grad():
                theta = self.theta.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.losses(theta, b).sum() / n, theta, create_graph=True)
                if not g.requires_grad:  # no graph of the gradient: never read as a zero Hessian
                    raise RuntimeError(
                        "the gradient has no graph to differentiate again (an operation's backward is marked "
                        "once-differentiable, or runs outside autograd)"
                    )
                return torch.stack([torch.autograd.grad(g, theta, v, retain_graph=True)[0] for v in vectors])
        except RuntimeError as err:
            raise RuntimeError(
                f"Hessian-vector products of {type(self.model).__name__} failed both by forward-over-reverse AD "
                f"({forward_error or 'earlier'}) and by double backward ({str(err).splitlines()[0]}): PyTorch has no second "
                "derivative for an operation of the model. Fix: use a curvature that needs first derivatives "
                "only (curvature='ekfac' or 'kfac' for Linear/Conv layers, 'identity'), or TracIn / TRAK."
            ) from err

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

        def single_out(theta: torch.Tensor, example: tuple | dict) -> torch.Tensor:
            return self.call(out_module, theta, map_batch(lambda t: t.unsqueeze(0), example))[0].reshape(-1)

        def single_loss(o: torch.Tensor, shape: torch.Size, example: tuple | dict) -> torch.Tensor:
            batch = map_batch(lambda t: t.unsqueeze(0), example)
            return self.task.loss_from_outputs(o.reshape(1, *shape), batch)[0]

        def batch_ggn(batch: tuple | dict) -> torch.Tensor:
            b = self.prepare(batch)
            jac = self.over_examples(jacrev(single_out), (self.theta,), (b,))  # (b, k, p)
            with torch.no_grad():
                outs = self.call(out_module, self.theta, b)
            shape = outs.shape[1:]
            flat_out = outs.reshape(outs.shape[0], -1)
            hess_out = self.over_examples(
                jacrev(jacrev(lambda o, ex, shape=shape: single_loss(o, shape, ex))), (), (flat_out, b)
            )  # (b, k, k)
            if progress is not None:
                progress(batch_length(b))
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
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise bad_value(
            "model",
            "a model on the 'meta' device",
            f"{len(meta)} of its tensors ({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}) are meta "
            "tensors, which have a shape but no values, so there are no trained weights to attribute (a model "
            "built under torch.device('meta'), or loaded with init_empty_weights / low_cpu_mem_usage)",
            "load the trained weights first, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(state_dict)",
        )
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise bad_value("dtype", dtype, "expected a floating torch dtype or None", "pass torch.float64")
    if dtype is not None:
        check_working_dtype(dtype)


def batch_failure(task: Task, what: str, batch: tuple | dict, err: BaseException) -> ValueError:
    """The error for a task that failed on a batch: the shapes it got and what usually disagrees (for a dict batch,
    that the task must read dicts, and a model operation that ``torch.func`` cannot differentiate)."""
    if "doesn't have storage" in str(err):  # a kernel that reads raw memory, which torch.func's wrappers lack
        return ValueError(
            f"running {type(task).__name__} on a batch of {what} failed ({type(err).__name__}: {err}): an operation "
            "of the model reads the raw memory of a tensor, which torch.func's transforms (grad, vmap), used for "
            "every per-example gradient, do not provide. The usual one is a packed sequence "
            "(nn.utils.rnn.pack_padded_sequence) run through nn.LSTM / GRU / RNN. Fix: run the recurrent layer on "
            "the padded batch and take each sequence's last real step, out[torch.arange(len(x)), lengths - 1] "
            "(the same function for a one-directional layer with right padding), or replace the operation."
        )
    if isinstance(batch, dict):
        return ValueError(
            f"running {type(task).__name__} on a batch of {what} failed ({type(err).__name__}: {err}). The "
            f"batches are dicts with keys "
            f"{sorted(batch)} (a Dataset that returns dicts, e.g. the Hugging Face form); datatrace passes them to "
            "the task as they are. Fix: for a Hugging Face model use datatrace.hf.SequenceClassificationTask or "
            "CausalLMTask; for a built-in task name the keys (ClassificationTask(input_key='x', target_key='y')); "
            "or write a Task whose loss (and outputs / loss_from_outputs, measurement) read the dict, e.g. "
            "model(batch['input_ids']) and batch['labels']."
        )
    items = batch.items() if isinstance(batch, dict) else enumerate(batch)
    shapes = {k: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for k, t in items}
    shapes = shapes if isinstance(batch, dict) else list(shapes.values())
    return ValueError(
        f"running {type(task).__name__} on a batch of {what} failed: {err}. The batch's elements have shapes "
        f"{shapes}. Fix: check that the model, the task and the data agree (input width, number of outputs, "
        "label type)."
    )


def memory_failure(what: str, batch: tuple | dict, err: BaseException) -> MemoryError:
    """The error for running out of memory on a batch: a size problem, never reported as a data mismatch."""
    try:
        size: int | str = batch_length(batch)
    except ValueError:
        size = "?"
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
    except (RuntimeError, IndexError, KeyError, TypeError) as err:
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

    def rows(idx: torch.Tensor, batch: tuple | dict) -> torch.Tensor:
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
    "HALF_DTYPES",
    "FunctionalModel",
    "batch_failure",
    "check_model_and_task",
    "check_rows_finite",
    "check_working_dtype",
    "checked_rows",
    "eval_mode",
    "memory_failure",
    "model_parameters_dtype",
    "per_example_rows",
    "prepare_model",
    "second_order_kernels",
]
