"""The state of a training run between two optimizer steps, and its file form.

A :class:`TrainState` holds what step ``t`` of a run reads: the parameters (those the optimizer updates, and the
frozen ones), the module buffers (BatchNorm's running statistics) and the optimizer's per-parameter state. Files
are safetensors (no pickle): tensors under ``param/<name>``, ``buffer/<name>``, ``opt/<name>/<key>``, and the
integer step counters of Adam in the file's JSON metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["TrainState", "load_state", "restore_training", "save_state", "state_from_training"]


@dataclass
class TrainState:
    """Parameters, buffers and optimizer state before step ``t`` (``t`` steps done)."""

    t: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt: dict[str, dict[str, Any]] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the state's tensors (parameters, buffers, optimizer state)."""
        tensors = [*self.params.values(), *self.buffers.values()]
        tensors += [v for entry in self.opt.values() for v in entry.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def detached(self) -> TrainState:
        """A copy whose tensors are detached from any autograd graph."""

        def d(v: Any) -> Any:
            return v.detach() if isinstance(v, torch.Tensor) else v

        return TrainState(
            self.t,
            {k: d(v) for k, v in self.params.items()},
            {k: d(v) for k, v in self.buffers.items()},
            {k: {kk: d(vv) for kk, vv in s.items()} for k, s in self.opt.items()},
        )


def state_from_training(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str], t: int
) -> TrainState:
    """A detached copy of a live model's and optimizer's state (``names``: ``id(param) -> name``)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    opt: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = optimizer.state.get(p, {})
            opt[names[id(p)]] = {
                k: (v.detach().clone() if isinstance(v, torch.Tensor) and v.ndim > 0 else _scalar(v))
                for k, v in entry.items()
            }
    return TrainState(t, params, buffers, opt)


def restore_training(
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    hyper: list[dict[str, Any]],
) -> None:
    """The inverse of :func:`state_from_training`: ``state`` copied into a live model (parameters, buffers) and
    optimizer (per-parameter state, and each group's hyper-parameters ``hyper``); ``names``: ``id(param) -> name``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state.params[name])
        for name, b in model.named_buffers():
            if name in state.buffers:
                b.copy_(state.buffers[name])
    for group, saved in zip(optimizer.param_groups, hyper):
        for key, value in saved.items():
            group[key] = value if not isinstance(group.get(key), tuple) else tuple(value)
        for p in group["params"]:
            restored: dict[str, Any] = {}
            for key, value in state.opt.get(names[id(p)], {}).items():
                if isinstance(value, torch.Tensor):
                    restored[key] = value.to(p.device).clone()
                elif key == "step":  # torch.optim keeps Adam's step count as a tensor
                    restored[key] = torch.tensor(float(value), dtype=torch.float32)
                else:
                    restored[key] = value
            if restored:
                optimizer.state[p] = restored


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    return int(v) if isinstance(v, float) and v.is_integer() else v


def save_state(state: TrainState, path: str | Path) -> None:
    """Write ``state`` as one safetensors file at ``path`` (the caller makes it atomic)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, v in state.params.items():
        tensors[f"param/{name}"] = v.detach().contiguous()
    for name, v in state.buffers.items():
        tensors[f"buffer/{name}"] = v.detach().contiguous()
    for name, entry in state.opt.items():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{name}/{key}"] = v.detach().contiguous()
            else:
                scalars.setdefault(name, {})[key] = v
    save_file(tensors, str(path), metadata={"t": str(state.t), "scalars": json.dumps(scalars)})


def load_state(path: str | Path, device: torch.device | str | None = None) -> TrainState:
    """Read a state written by :func:`save_state`."""
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    opt: dict[str, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
        meta = f.metadata() or {}
        for key in f.keys():
            kind, _, rest = key.partition("/")
            if kind == "param":
                params[rest] = f.get_tensor(key)
            elif kind == "buffer":
                buffers[rest] = f.get_tensor(key)
            else:
                name, _, sub = rest.rpartition("/")
                opt.setdefault(name, {})[sub] = f.get_tensor(key)
    for name, entry in json.loads(meta.get("scalars", "{}")).items():
        opt.setdefault(name, {}).update(entry)
    return TrainState(int(meta.get("t", 0)), params, buffers, opt)
