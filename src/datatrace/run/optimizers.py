"""Optimizer steps as pure, differentiable functions: what a replay of a recorded training run executes.

Each step maps ``(theta_t, s_t, g_t)`` (parameters, optimizer state, gradient of the step's minibatch objective)
to ``(theta_{t+1}, s_{t+1})`` with the same arithmetic as ``torch.optim`` (PyTorch 2.x, ``maximize=False``):

* **SGD** (momentum ``mu``, dampening ``tau``, Nesterov, L2 ``wd``): ``d = g + wd * theta``;
  ``b = d`` on the first step, else ``b = mu * b + (1 - tau) * d``; ``d = d + mu * b`` (Nesterov) or ``d = b``;
  ``theta = theta - lr * d``.
* **Adam** (``beta1, beta2, eps``, L2 ``wd``): ``k = k + 1``; ``g = g + wd * theta``;
  ``m = beta1 m + (1 - beta1) g``; ``v = beta2 v + (1 - beta2) g^2``;
  ``theta = theta - lr / (1 - beta1^k) * m / (sqrt(v) / sqrt(1 - beta2^k) + eps)`` (Kingma & Ba 2015).
* **AdamW**: ``theta = theta (1 - lr * wd)`` first (decoupled decay, Loshchilov & Hutter 2019), then Adam with
  ``wd = 0``.

Written with out-of-place tensor operations so that autograd can differentiate a step with respect to ``theta``,
``s`` and ``g`` (the reverse pass of :mod:`datatrace.run.metagradient`). ``sqrt(v)`` has a zero-safe derivative:
where ``v = 0`` every gradient seen so far was zero and so is the derivative of ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from datatrace.errors import bad_value

__all__ = ["HYPER_KEYS", "OPTIMIZERS", "describe_optimizer", "initial_state", "optimizer_step", "state_keys"]

#: the optimizers a replay reproduces (``torch.optim`` class name -> kind)
OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}

#: the hyper-parameters each kind reads from a parameter group
HYPER_KEYS = {
    "sgd": ("lr", "momentum", "dampening", "nesterov", "weight_decay"),
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
}


def state_keys(kind: str, hyper: dict[str, Any]) -> tuple[str, ...]:
    """The per-parameter state tensors of ``kind`` (as named in ``torch.optim``'s ``state_dict``)."""
    if kind == "sgd":
        return ("momentum_buffer",) if hyper["momentum"] else ()
    return ("exp_avg", "exp_avg_sq")


def describe_optimizer(optimizer: torch.optim.Optimizer) -> tuple[str, list[dict[str, Any]]]:
    """``(kind, hyper-parameters of each group)`` of a ``torch.optim`` optimizer, or a clear refusal.

    Refused: optimizers other than SGD/Adam/AdamW, and options whose arithmetic the replay does not reproduce
    (``maximize``, ``amsgrad``, a tensor learning rate with ``capturable``/``differentiable`` set).
    """
    name = type(optimizer).__name__
    if name not in OPTIMIZERS or not isinstance(optimizer, torch.optim.Optimizer):
        raise bad_value(
            "optimizer",
            optimizer,
            f"a replay reproduces {sorted(OPTIMIZERS)} from torch.optim",
            "train with torch.optim.SGD, Adam or AdamW (learning-rate schedulers are fine: the rate of every step "
            "is recorded)",
        )
    kind = OPTIMIZERS[name]
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        for flag in ("maximize", "amsgrad"):
            if group.get(flag):
                raise bad_value(
                    f"optimizer.param_groups[{g}]['{flag}']",
                    True,
                    f"a replay reproduces {name} with {flag}=False",
                    f"train with {flag}=False",
                )
        hyper = {}
        for key in HYPER_KEYS[kind]:
            value = group[key]
            if isinstance(value, torch.Tensor):
                value = value.item()
            hyper[key] = [float(v) for v in value] if key == "betas" else value
        groups.append(hyper)
    return kind, groups


def initial_state(kind: str, hyper: dict[str, Any], param: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The state of one parameter before its first step (``momentum_buffer`` is created by that step)."""
    if kind == "sgd":
        return {"momentum_buffer": None} if hyper["momentum"] else {}
    return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param), "step": 0}


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` (bit for bit) whose derivative is 0 where ``v = 0``: ``sqrt(v m + 1 - m) m`` with ``m = [v > 0]``.
    Written with products rather than ``torch.where``, whose backward has no batching rule for the batched
    vector-Jacobian products of the reverse pass (a loop over the queries)."""
    mask = (v > 0).to(v.dtype)
    return (v * mask + (1.0 - mask)).sqrt() * mask


def optimizer_step(
    kind: str,
    hyper: dict[str, Any],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, Any]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """One step of ``kind`` on the parameters of one group: new parameters and new states (inputs untouched)."""
    lr = float(hyper["lr"])
    wd = float(hyper.get("weight_decay", 0.0))
    new_params, new_states = [], []
    for p, g, s in zip(params, grads, states):
        if kind == "sgd":
            d = g + wd * p if wd else g
            mu = float(hyper["momentum"])
            state: dict[str, Any] = {}
            if mu:
                buf = s["momentum_buffer"]
                buf = d if buf is None else mu * buf + (1.0 - float(hyper["dampening"])) * d
                state["momentum_buffer"] = buf
                d = d + mu * buf if hyper["nesterov"] else buf
            new_params.append(p - lr * d)
            new_states.append(state)
            continue
        beta1, beta2 = (float(b) for b in hyper["betas"])
        step = int(s["step"]) + 1
        if kind == "adamw":
            p = p * (1.0 - lr * wd) if wd else p
        elif wd:
            g = g + wd * p
        m = beta1 * s["exp_avg"] + (1.0 - beta1) * g
        v = beta2 * s["exp_avg_sq"] + (1.0 - beta2) * g * g
        bias1 = 1.0 - beta1**step
        bias2_sqrt = (1.0 - beta2**step) ** 0.5
        denom = _safe_sqrt(v) / bias2_sqrt + float(hyper["eps"])
        new_params.append(p - (lr / bias1) * m / denom)
        new_states.append({"exp_avg": m, "exp_avg_sq": v, "step": step})
    return new_params, new_states
