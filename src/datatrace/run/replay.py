"""Replay a recorded training run step by step, optionally with per-example weights and an autograd graph.

Step ``t`` of a run (:mod:`datatrace.run.recording`) is the map

    (theta_t, s_t, beta_t)  ->  (theta_{t+1}, s_{t+1}, beta_{t+1}),
    g_t = grad_theta [ (1/|B_t|) sum_{j in B_t} w_j l(z_j, theta_t) + sum_b lambda_b/2 ||theta_b||^2 ],

clipped to the recorded ``max_grad_norm`` when the loop clipped it, followed by the recorded optimizer's update (:mod:`datatrace.run.optimizers`) of ``theta`` and its state ``s``;
``beta`` are BatchNorm running statistics, updated from the minibatch as ``beta <- (1 - m) beta + m * stat``.
``w_j = 1`` reproduces the recorded run; ``w_i = 0`` on every step removes example ``i``'s loss terms from the run
while keeping its order, minibatches, seeds and normalisers (the removal that the metagradient differentiates
and :func:`datatrace.verification.retrain.single_model_subsets` measures). Each step re-seeds the RNG with the
recorded seed so that dropout draws the same masks, and runs the model in training mode (modules that were in
eval mode when the run started stay so).

With ``graph=True`` the step is built with ``create_graph`` so that autograd can take vector-Jacobian products
through it with respect to ``theta_t``, ``s_t``, ``beta_t`` and the step's weights (the reverse pass of
:mod:`datatrace.run.metagradient`). PyTorch updates BatchNorm's running statistics in place, outside autograd, so
the replay recomputes them differentiably from the layer's input (biased mean, unbiased variance, as
``F.batch_norm`` does) and carries those; attention and recurrent layers run their reference kernels there
(:func:`~datatrace.gradients.functional.second_order_kernels`: the fused ones have no double backward).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from datatrace.data import DataLike, DataSource, as_data_source, cast_batch
from datatrace.errors import bad_value
from datatrace.gradients.functional import BoundFunction, second_order_kernels
from datatrace.run.optimizers import initial_state, optimizer_step
from datatrace.run.recording import Recording, set_seed
from datatrace.run.smoothness import non_smooth_operations
from datatrace.run.state import TrainState
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

__all__ = ["Replay", "ReplayMismatchError", "recorded_data_source", "replay_tolerance"]


def recorded_data_source(data: DataLike) -> DataSource:
    """The training data as the recording indexes it: a DataLoader stands for its whole ``dataset`` (the recorded
    indices are positions in it, whatever its sampler) read with its own ``collate_fn`` (e.g. padding)."""
    if isinstance(data, DataLoader):
        data = DataLoader(data.dataset, batch_size=data.batch_size or 1, collate_fn=data.collate_fn)
    return as_data_source(data, "train")


def _eval_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in eval mode as plain tensor operations: ``(x - mu) / sqrt(var + eps) * gamma + beta``."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x - module.running_mean.reshape(shape)) / torch.sqrt(
        module.running_var.reshape(shape) + module.eps
    )
    if module.affine:
        out = out * module.weight.reshape(shape) + module.bias.reshape(shape)
    return out


class ReplayMismatchError(RuntimeError):
    """The replay does not reproduce a saved state of the recording (the loop did something the replay does not)."""


def replay_tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference between a replayed and a saved state that counts as the same run."""
    return 1e-7 if dtype == torch.float64 else 2e-3


class Replay:
    """A recorded run made executable again: ``step(state, t)`` is step ``t`` of the run.

    Args:
        model: a model of the recorded architecture (its values are not used: states come from the recording).
        task: the task whose ``loss`` the run minimised (and whose L2 term it added).
        recording: the :class:`~datatrace.run.recording.Recording`.
        data: the training set the recording's indices refer to (a DataLoader stands for its ``dataset``).
    """

    def __init__(self, model: nn.Module, task: Task, recording: Recording, data: DataLike) -> None:
        if not isinstance(model, nn.Module):
            raise bad_value(
                "model", model, "a torch.nn.Module of the recorded architecture", "pass the model"
            )
        self.source = recorded_data_source(data)
        if len(self.source) != recording.n_train:
            raise bad_value(
                "train",
                f"{len(self.source)} examples",
                f"the training set of the recording ({recording.n_train} examples, indexed as recorded)",
                "pass the same dataset the recorded loop read (for a DataLoader, its dataset)",
            )
        self.recording, self.task = recording, task
        self.model = copy.deepcopy(model)
        self.model.train()
        for name, module in self.model.named_modules():
            if name in recording.modules_in_eval:
                module.eval()
        names = {n for n, _ in self.model.named_parameters()}
        self.groups = recording.groups
        missing = sorted({n for g in self.groups for n in g} - names)
        if missing:
            raise bad_value(
                "model",
                type(model).__name__,
                f"the recorded architecture; it lacks the recorded parameters {missing[:5]}",
                "pass a model built like the one that was trained",
            )
        self.trainable = [n for g in self.groups for n in g]
        self.decay = {n: task.weight_decay_for(n) for n in self.trainable}
        self.loss_module = BoundFunction(self.model, task.loss)
        self.batch_norms = {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
        }
        self.device = next(self.model.parameters()).device
        first = recording.state(0, self.device)
        self.dtype = next(iter(first.params.values())).dtype

    @property
    def n_steps(self) -> int:
        return self.recording.n_steps

    def batch(self, t: int) -> tuple | dict:
        """The minibatch of step ``t`` in the working dtype and device."""
        return cast_batch(self.source.get(self.recording.steps[t].indices), self.dtype, self.device)

    # -- one step ----------------------------------------------------------------------------------------------
    def step(
        self, state: TrainState, t: int, weights: torch.Tensor | None = None, graph: bool = False
    ) -> tuple[TrainState, torch.Tensor]:
        """Step ``t`` from ``state``: ``(state after it, the step's example weights)``.

        ``weights`` is the ``(n_train,)`` weight of every training example (default all ones); the returned
        ``(|B_t|,)`` tensor holds this step's share of it and, with ``graph=True``, is a leaf that requires grad.
        """
        record = self.recording.steps[t]
        idx = record.indices
        w = torch.ones(len(idx), dtype=self.dtype, device=self.device) if weights is None else weights[idx]
        w = w.detach().to(self.dtype).requires_grad_(graph)
        with torch.enable_grad():
            params = dict(state.params)
            for n in self.trainable:
                if not graph or not params[n].requires_grad:
                    params[n] = params[n].detach().requires_grad_(True)
            buffers = {n: b.detach().clone() for n, b in state.buffers.items()}
            set_seed(record.seed)
            kernels = second_order_kernels() if graph else contextlib.nullcontext()
            with kernels, self._tracked_statistics(state.buffers, graph) as tracked:
                named = {"model." + n: v for n, v in {**params, **buffers}.items()}
                losses = functional_call(self.loss_module, named, (self.batch(t),))
            objective = (w * losses).sum() / len(idx)
            for n in self.trainable:
                if self.decay[n]:
                    objective = objective + 0.5 * self.decay[n] * (params[n] * params[n]).sum()
            wanted = [params[n] for n in self.trainable]
            grads = torch.autograd.grad(objective, wanted, create_graph=graph, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, grads)]
        if self.recording.max_grad_norm is not None:  # torch.nn.utils.clip_grad_norm_, out of place
            total = torch.sqrt(sum((g * g).sum() for g in grads))
            factor = torch.clamp(self.recording.max_grad_norm / (total + 1e-6), max=1.0)
            grads = [g * factor for g in grads]
        if not graph:
            grads = [g.detach() for g in grads]
            params = {n: p.detach() for n, p in params.items()}
        new_params = dict(params)
        new_opt = dict(state.opt)
        position = 0
        for g, names in enumerate(self.groups):
            hyper = record.hyper[g]
            kind = self.recording.kind
            group_params = [params[n] for n in names]
            states = [{**initial_state(kind, hyper, params[n]), **state.opt.get(n, {})} for n in names]
            with torch.set_grad_enabled(graph):
                stepped, stepped_states = optimizer_step(
                    kind, hyper, group_params, grads[position : position + len(names)], states
                )
            for n, p, s in zip(names, stepped, stepped_states):
                new_params[n] = p
                new_opt[n] = s
            position += len(names)
        new_buffers = {**buffers, **tracked}
        return TrainState(state.t + 1, new_params, new_buffers, new_opt), w

    @contextmanager
    def _tracked_statistics(
        self, old: dict[str, torch.Tensor], graph: bool
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Differentiable BatchNorm running statistics of the forward pass inside (only with ``graph``)."""
        tracked: dict[str, torch.Tensor] = {}
        if not graph or not self.batch_norms:
            yield tracked
            return

        def hook_for(name: str):
            prefix = f"{name}." if name else ""

            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0]
                dims = [0, *range(2, x.dim())]
                count = x.numel() // x.shape[1]
                mean = x.mean(dims)
                var = x.var(dims, unbiased=True) if count > 1 else x.var(dims, unbiased=False)
                if module.momentum is None:
                    done = int(old[prefix + "num_batches_tracked"]) + 1
                    factor = 1.0 / done
                else:
                    factor = float(module.momentum)
                tracked[prefix + "running_mean"] = (1 - factor) * old[prefix + "running_mean"] + factor * mean
                tracked[prefix + "running_var"] = (1 - factor) * old[prefix + "running_var"] + factor * var

            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in self.batch_norms.items()]
        try:
            yield tracked
        finally:
            for h in handles:
                h.remove()

    # -- many steps ----------------------------------------------------------------------------------------------
    def run(self, start: TrainState, stop: int, weights: torch.Tensor | None = None) -> TrainState:
        """The state before step ``stop``, replayed without a graph from ``start``."""
        state = start
        for t in range(start.t, stop):
            state, _ = self.step(state, t, weights)
        return state.detached()

    def check(self, replayed: TrainState, saved: TrainState) -> float:
        """``||theta_replayed - theta_saved|| / ||theta_saved||`` over all trained parameters; raises
        :class:`ReplayMismatchError` above :func:`replay_tolerance`.

        The norm is taken over all parameters together: a parameter whose true gradient is zero (a bias
        followed by BatchNorm) is moved by Adam on rounding noise alone (``m / sqrt(v)`` is of order 1 however
        small ``g`` is), so no replay can follow it tensor by tensor, and it does not change the function."""
        diff = sum(
            float(((replayed.params[n].detach() - saved.params[n]) ** 2).sum()) for n in self.trainable
        )
        norm = sum(float((saved.params[n] ** 2).sum()) for n in self.trainable)
        worst = math.sqrt(diff) / (math.sqrt(norm) + 1e-30)
        if not math.isfinite(worst) or worst > replay_tolerance(self.dtype):
            per_tensor = {
                n: float(
                    (replayed.params[n].detach() - saved.params[n]).norm() / (saved.params[n].norm() + 1e-30)
                )
                for n in self.trainable
            }
            where = max(per_tensor, key=per_tensor.get)
            raise ReplayMismatchError(
                f"replaying the recording up to step {saved.t} does not reproduce its saved parameters: they "
                f"differ by {worst:.3g} of their norm (tolerance {replay_tolerance(self.dtype):g}; most in {where}, "
                f"{per_tensor[where]:.3g} of its norm). The replay assumes each step minimised task.loss(model, "
                "batch).mean() plus the task's L2 term with the recorded SGD/Adam/AdamW step, on the recorded "
                "examples as the Dataset returns them. "
                "Fix: train with exactly that loss (no gradient accumulation, mixed precision or random data "
                "augmentation inside the Dataset; pass max_grad_norm= to the Recorder if the loop clips "
                "gradients), and pass the same task and data here."
            )
        return worst

    def initial(self) -> TrainState:
        """The recorded state before step 0."""
        return self._complete(self.recording.state(0, self.device))

    def saved(self, t: int) -> TrainState:
        """The recorded state before step ``t`` (a saved step)."""
        return self._complete(self.recording.state(t, self.device))

    def _complete(self, state: TrainState) -> TrainState:
        for n in self.trainable:
            state.opt[n] = {k: v for k, v in state.opt.get(n, {}).items() if v is not None}
        return state

    def evaluate(self, state: TrainState, fn: BoundFunction, batch: tuple | dict) -> torch.Tensor:
        """``fn`` (a bound task method) on ``batch`` with the model at ``state`` in eval mode, differentiable in
        the parameters and the float buffers (BatchNorm in eval mode normalises with its running statistics,
        written out so that autograd reaches them: ``native_batch_norm`` refuses a ``running_mean`` that
        requires grad)."""
        was = self.model.training
        self.model.eval()
        patched = []
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.forward = _eval_batch_norm.__get__(m)  # type: ignore[method-assign]
                patched.append(m)
        try:
            named = {"model." + n: v for n, v in {**state.params, **state.buffers}.items()}
            return functional_call(fn, named, (batch,))
        finally:
            for m in patched:
                del m.forward
            self.model.train(was)
            for name, module in self.model.named_modules():
                if name in self.recording.modules_in_eval:
                    module.eval()

    def model_at(self, state: TrainState) -> nn.Module:
        """A copy of the model holding ``state``'s parameters and buffers, in eval mode."""
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state.params[n])
            for n, b in model.named_buffers():
                b.copy_(state.buffers[n])
        return model.eval()

    def non_smooth_operations(self) -> list[str] | None:
        """The operations of the model's training loss that make this run non-differentiable in the data weights
        (:mod:`datatrace.run.smoothness`), seen in one forward pass on two examples of the first step; ``None``
        (unknown) when that forward pass fails outside a training step."""
        indices = self.recording.steps[0].indices[:2]
        batch = cast_batch(self.source.get(indices), self.dtype, self.device)
        state = self.initial()
        named = {"model." + n: v.detach().clone() for n, v in {**state.params, **state.buffers}.items()}
        try:
            return non_smooth_operations(lambda: functional_call(self.loss_module, named, (batch,)))
        except Exception as err:  # the probe only informs; the replay's own steps report real failures
            logger.info(
                "replay: could not list the model's non-smooth operations (%s: %s)", type(err).__name__, err
            )
            return None

    def describe(self) -> dict[str, Any]:
        return {
            "steps": self.n_steps,
            "optimizer": self.recording.kind,
            "batch_norm_layers": len(self.batch_norms),
        }
