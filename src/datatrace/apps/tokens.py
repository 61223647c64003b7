"""Token-wise influence: which tokens of a training sequence carry its influence on a query.

When a training example's loss is a sum of terms, ``l_i = sum_t l_{i,t}`` (a language model's next-token
negative log-likelihoods, :meth:`datatrace.hf.CausalLMTask.loss_terms`), its influence splits the same way:

    score[q, i] = (1/n) grad f_q^T H^{-1} grad l_i = sum_t (1/n) (H^{-1} grad f_q) . grad l_{i,t}  =: sum_t s_{q,i,t}

so ``s_{q,i,t}`` is the part of example ``i``'s leave-one-out effect on query ``q`` that comes through predicting
token ``t`` (same sign and units as the score; the terms sum to it exactly). With ``v = H^{-1} grad f_q`` solved once
per query, all of an example's terms are one Jacobian-vector product ``J_i v`` of its term vector, taken as two
backward passes (``d/du [grad_theta (u . l_i) . v]``), which works where forward-mode AD does not (fused attention
kernels) (Grosse et al. 2023, section 5.3, show such token-wise attributions for LLMs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datatrace.attributors.influence import InfluenceFunction
from datatrace.data import DataLike
from datatrace.errors import bad_value, check_indices
from datatrace.gradients.functional import BoundFunction, second_order_kernels

__all__ = ["token_influence"]


def token_influence(
    influence: InfluenceFunction, query: DataLike, train_indices: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """``(n_query, len(train_indices), T)``: each listed training example's influence on each query, split by the
    loss term (token) it comes through; summed over the last axis it equals ``influence.score(query)`` at those
    columns. The task must define ``loss_terms(model, batch) -> (b, T)`` whose rows sum to its loss (e.g.
    :class:`datatrace.hf.CausalLMTask`). Training examples are padded to the longest listed one with zeros."""
    task = influence.task
    if not callable(getattr(task, "loss_terms", None)):
        raise bad_value(
            "influence.task",
            type(task).__name__,
            "a task with loss_terms(model, batch) -> (batch, terms) whose rows sum to its loss",
            "use datatrace.hf.CausalLMTask, or add loss_terms to your task",
        )
    fmodel = influence.functional_model
    source = influence.training_data
    if source is None:
        raise bad_value(
            "influence", influence, "an InfluenceFunction that keeps its training data", "fit it first"
        )
    idx = check_indices("train_indices", train_indices, len(source))
    solved = influence.solve(influence.query_gradients(query)) / influence.n_train  # (n_query, p)
    terms_module = BoundFunction(fmodel.model, task.loss_terms)
    rows = []
    for i in idx.tolist():
        example = fmodel.prepare(source.get([i]))
        rows.append(_term_products(fmodel, terms_module, example, solved))
    width = max(r.shape[1] for r in rows)
    out = torch.zeros(solved.shape[0], len(rows), width, dtype=solved.dtype)
    for j, r in enumerate(rows):
        out[:, j, : r.shape[1]] = r
    return out


def _term_products(fmodel, module, example, vectors: torch.Tensor) -> torch.Tensor:
    """``(n_query, T)``: ``grad l_t . v`` for every term ``t`` of one example and every row ``v``."""
    with torch.enable_grad(), second_order_kernels():
        theta = fmodel.theta.detach().requires_grad_(True)
        terms = fmodel.call(module, theta, example).reshape(-1)
        u = torch.zeros_like(terms, requires_grad=True)
        (g,) = torch.autograd.grad((terms * u).sum(), theta, create_graph=True)
        out = []
        for v in vectors:
            (jv,) = torch.autograd.grad(g @ v, u, retain_graph=True)
            out.append(jv.detach())
    return torch.stack(out)
