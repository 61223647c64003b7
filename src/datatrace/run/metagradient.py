"""Exact derivatives of a query measurement with respect to every training example's weight in a recorded run.

Let a run of ``T`` steps (:mod:`datatrace.run.replay`) map the example weights ``w`` (all ones in the recorded
run) to final parameters ``theta_T(w)``, and let ``f(theta_T)`` be a query measurement. The *metagradient*
``d f / d w_i`` collects example ``i``'s effect through every step that used it and everything those steps
changed afterwards (parameters, Adam's moments, momentum, BatchNorm statistics). It is computed by reverse-mode
differentiation through the optimizer steps (Maclaurin et al. 2015; Ilyas & Engstrom 2025, "MAGIC"):

    a_T = grad f(theta_T);    for t = T-1 .. 0:   (a_t, dw_t) = a_{t+1}^T d(state_{t+1}) / d(state_t, w_t),

and ``d f / d w_i = sum_{t: i in B_t} dw_t[i]``. Removing example ``i`` from the run (weight 0) changes ``f`` by
``-d f / d w_i`` to first order: that is datatrace's leave-one-out convention (``score ~ f(without i) - f``).

Memory: the reverse pass needs the state before every step, in reverse order. States are recomputed from
anchors: the saved states of the recording, and, between saved states more than ``k`` steps apart, states kept
in memory every ``k`` steps (Griewank 1992's two-level checkpointing). At most ``ceil(L / k) + k + 2`` states
are held at once (``L`` the longest stretch between saved states): ``O(sqrt T)`` with the default ``k``, which
is ``L`` itself when ``L <= 4 sqrt(T)`` (no second forward pass) and ``ceil(sqrt(T))`` otherwise.
Cost: every step is replayed with a graph for the vector-Jacobian products through its double backward, and
before that without one to recover the segment's states (plus once more for the anchors of long stretches). When
a segment's graphs fit ``graph_budget``, the segment is instead replayed once with graphs, held until its reverse
pass (``k`` graphs in memory instead of ``k`` states), which saves the replay without a graph. The queries of one
pass share the replays, and each adds one product per step (batched with ``vmap`` where the model allows).
Measured costs are in benchmarks/README.md (``bench_metagradient.py``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from datatrace.run.replay import Replay
from datatrace.run.state import TrainState

logger = logging.getLogger(__name__)

__all__ = ["MetagradientResult", "graph_bytes", "metagradients"]

#: measurement of the final state: ``TrainState -> (n_query,)`` tensor, differentiable in params and buffers
FinalMeasurement = Callable[[TrainState], torch.Tensor]


@dataclass
class MetagradientResult:
    """``grads[q, i] = d f_q / d w_i`` and what the reverse pass cost."""

    grads: torch.Tensor
    max_states_held: int
    segment: int
    replay_error: float
    info: dict[str, Any] = field(default_factory=dict)


def _leaves(state: TrainState, trainable: list[str]) -> TrainState:
    """A copy of ``state`` whose differentiable tensors are fresh leaves that require grad."""
    s = state.detached()
    for n in trainable:
        s.params[n].requires_grad_(True)
        for v in s.opt.get(n, {}).values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.requires_grad_(True)
    for b in s.buffers.values():
        if b.is_floating_point():
            b.requires_grad_(True)
    return s


def _slots(state: TrainState, trainable: list[str]) -> list[tuple[str, str, str]]:
    """The differentiable tensors of a state, as ``(kind, name, key)`` in a fixed order."""
    slots = [("param", n, "") for n in trainable]
    for n in trainable:
        for k, v in sorted(state.opt.get(n, {}).items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                slots.append(("opt", n, k))
    slots += [("buffer", n, "") for n, b in sorted(state.buffers.items()) if b.is_floating_point()]
    return slots


def _get(state: TrainState, slot: tuple[str, str, str]) -> torch.Tensor | None:
    kind, name, key = slot
    if kind == "param":
        return state.params[name]
    if kind == "opt":
        return state.opt.get(name, {}).get(key)
    return state.buffers.get(name)


def metagradients(
    replay: Replay,
    measure: FinalMeasurement,
    n_query: int,
    *,
    segment: int | None = None,
    graph_budget: int = 0,
    progress: Callable[[int], None] | None = None,
) -> MetagradientResult:
    """``d f_q / d w_i`` for the queries measured by ``measure`` on the final state (module docstring).

    ``graph_budget`` (bytes): when a segment's autograd graphs fit it (:func:`graph_bytes` of one step times the
    segment), each segment is replayed once, with graphs, and they are held for its reverse pass; otherwise (and
    with the default ``0``) the segment is replayed without graphs and each step is rebuilt with its graph in
    reverse order. Both give the same numbers; holding saves one replay of every step."""
    rec = replay.recording
    T = rec.n_steps
    saved = rec.checkpoint_steps
    longest = max(b - a for a, b in itertools.pairwise(saved))
    root = max(1, math.ceil(math.sqrt(T)))
    # one level (segments = the saved stretches, no extra forward pass) while that holds O(sqrt T) states
    k = int(segment) if segment else (longest if longest <= 4 * root else root)
    trainable = replay.trainable
    grads = torch.zeros(n_query, rec.n_train, dtype=replay.dtype, device=replay.device)
    held = 0
    worst = 0.0

    # a_T: the measurement's gradient on the saved final state (the model the scores are about)
    end = replay.saved(T)  # the saved state closing the stretch being reversed (each saved file is read once)
    final = _leaves(end, trainable)
    values = measure(final)
    slots = [
        s for s in _slots(final, trainable) if _get(final, s) is not None and _get(final, s).requires_grad
    ]
    inputs = [_get(final, s) for s in slots]
    adjoint: dict[tuple[str, str, str], torch.Tensor] = {}
    rows = [
        torch.autograd.grad(values[q], inputs, retain_graph=True, allow_unused=True) for q in range(n_query)
    ]
    for j, slot in enumerate(slots):
        parts = [r[j] if r[j] is not None else torch.zeros_like(inputs[j]) for r in rows]
        adjoint[slot] = torch.stack(parts).detach()
    del final, values, rows

    per_graph = graph_bytes(replay) if graph_budget > 0 else 0
    hold = 0 < per_graph * k <= graph_budget
    batched_ok = True
    for a, b in reversed(list(itertools.pairwise(saved))):
        anchors: dict[int, TrainState] = {a: replay.saved(a)}
        saved_b, end = end, anchors[a]
        if b - a > k:  # keep every k-th state of this stretch in memory
            state = anchors[a]
            for start in range(a + k, b, k):
                state = replay.run(state, start)
                anchors[start] = state
            worst = max(worst, replay.check(replay.run(state, b), saved_b))
        for start in sorted(anchors, reverse=True):
            stop = min(start + k, b) if b - a > k else b
            states: list[Any] = [anchors[start]]
            if hold:  # every step of the segment with its graph, reversed below
                states = [_graph_step(replay, anchors[start], start)]
                for t in range(start + 1, stop):
                    states.append(_graph_step(replay, states[-1][1].detached(), t))
            else:
                for t in range(start, stop - 1):
                    states.append(replay.step(states[-1], t)[0].detached())
            held = max(held, len(anchors) + len(states) + 2)
            for t in range(stop - 1, start - 1, -1):
                if hold:
                    s_in, s_out, w = states.pop()
                else:
                    s_in, s_out, w = _graph_step(replay, states[t - start], t)
                if t == b - 1 and b - a <= k:
                    worst = max(worst, replay.check(s_out, saved_b))
                out_slots = [
                    s for s in adjoint if _get(s_out, s) is not None and _get(s_out, s).requires_grad
                ]
                outputs = [_get(s_out, s) for s in out_slots]
                in_slots = [s for s in _slots(s_in, trainable) if _get(s_in, s) is not None]
                in_tensors = [_get(s_in, s) for s in in_slots] + [w]
                cotangents = [adjoint[s] for s in out_slots]
                result, batched_ok = _vjp(outputs, in_tensors, cotangents, n_query, batched_ok)
                adjoint = {s: r for s, r in zip(in_slots, result[:-1]) if r is not None}
                grads.index_add_(1, rec.steps[t].indices.to(grads.device), result[-1])
                if progress is not None:
                    progress(1)
            del states
        del anchors
    info = {"batched_queries": batched_ok, "held_graphs": hold, "graph_bytes_per_step": per_graph or None}
    return MetagradientResult(grads, held, k, worst, info)


def _graph_step(replay: Replay, state: TrainState, t: int) -> tuple[TrainState, TrainState, torch.Tensor]:
    """``(input leaves, output, weights)`` of step ``t`` from ``state``, built with its autograd graph."""
    s_in = _leaves(state, replay.trainable)
    s_out, w = replay.step(s_in, t, graph=True)
    return s_in, s_out, w


def graph_bytes(replay: Replay) -> int:
    """Bytes one step's autograd graph holds (the first step from the initial state), estimated as twice the
    tensors autograd saves for its double backward (each storage once) plus the step's output state: the
    factor covers the allocator and the tensors the graph creates without saving them."""
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        storages[storage.data_ptr() or id(x)] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _, s_out, _ = _graph_step(replay, replay.initial(), 0)
    return 2 * (sum(storages.values()) + s_out.nbytes())


def _vjp(
    outputs: list[torch.Tensor],
    inputs: list[torch.Tensor],
    cotangents: list[torch.Tensor],
    n_query: int,
    batched: bool,
) -> tuple[list[torch.Tensor | None], bool]:
    """``cotangents^T d outputs / d inputs`` for each of ``n_query`` stacked cotangents: one batched product
    (``is_grads_batched``) while the model allows it, else a loop over the queries. The last input's rows are
    always returned (zeros where it did not matter)."""
    if batched and n_query > 1:
        try:
            got = torch.autograd.grad(
                outputs, inputs, cotangents, is_grads_batched=True, allow_unused=True, retain_graph=True
            )
            return _fill(got, inputs, n_query), True
        except RuntimeError as err:  # an operation without a batching rule: loop from now on
            logger.info(
                "metagradient: batched vector-Jacobian products failed (%s); looping over queries", err
            )
    per_query = [
        torch.autograd.grad(
            outputs, inputs, [c[q] for c in cotangents], allow_unused=True, retain_graph=q < n_query - 1
        )
        for q in range(n_query)
    ]
    stacked = []
    for j, x in enumerate(inputs):
        parts = [p[j] for p in per_query]
        stacked.append(None if all(p is None for p in parts) else torch.stack([_z(p, x) for p in parts]))
    return _fill(stacked, inputs, n_query), batched if n_query <= 1 else False


def _z(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if value is None else value


def _fill(got: Any, inputs: list[torch.Tensor], n_query: int) -> list[torch.Tensor | None]:
    out = [None if g is None else g.detach() for g in got]
    if out[-1] is None:
        out[-1] = torch.zeros(n_query, *inputs[-1].shape, dtype=inputs[-1].dtype, device=inputs[-1].device)
    return out
