"""The layers whose per-example gradients factorise as ``s a^T``, shared by K-FAC/EK-FAC and LoGra projections.

For ``nn.Linear``, ``nn.Conv2d`` (groups=1) and Hugging Face's ``Conv1D`` the gradient of a layer's weight is
``sum_t s_t a_t^T`` over positions ``t`` (tokens, or spatial locations of a convolution, Grosse & Martens 2016),
with ``a`` the input rows (unfolded patches for a convolution, a 1 appended for the bias) and ``s`` the gradient
with respect to the layer's output. This module finds those layers among the parameters in scope
(:func:`scan_layers`) and turns a layer's input and output gradient into the rows ``a`` and ``s``
(:func:`input_rows`, :func:`output_rows`). What each route does with them stays in the route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datatrace.gradients.functional import FunctionalModel

SUPPORTED_LAYERS = "nn.Linear, nn.Conv2d (groups=1) and transformers' Conv1D"


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"``, ``"conv1d"`` (Hugging Face's transposed dense layer) or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    ):
        return "conv1d"
    return None


@dataclass(frozen=True)
class LayerSpec:
    """A supported module with at least one parameter in scope (names as in ``fmodel.space``)."""

    name: str
    module: nn.Module
    kind: str
    weight: str | None
    bias: str | None
    in_dim: int  # width of the input patch, without the bias column
    out_dim: int


def scan_layers(fmodel: FunctionalModel, who: str, fix: str) -> tuple[list[LayerSpec], list[str]]:
    """Supported layers owning parameters in scope (model order), and the in-scope parameters they do not cover.

    Uncovered parameters shared by several modules are described as such. A grouped Conv2d raises a ValueError
    naming ``who`` (the route) and ending with ``fix``.
    """
    named = dict(fmodel.model.named_parameters())
    in_scope = {id(named[n]): n for n in fmodel.space.names if n in named}
    owners: dict[int, dict[int, str]] = {}  # id(parameter) -> {id(module): module name}
    for mname, module in fmodel.model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None and id(p) in in_scope:
                owners.setdefault(id(p), {}).setdefault(id(module), mname)
    layers: list[LayerSpec] = []
    covered: set[str] = set()
    problems: dict[str, str] = {}
    for mname, module in fmodel.model.named_modules():  # each module once
        kind = layer_kind(module)
        if kind is None:
            continue
        weight = in_scope.get(id(module.weight)) if isinstance(module.weight, torch.Tensor) else None
        bias_p = getattr(module, "bias", None)
        bias = in_scope.get(id(bias_p)) if isinstance(bias_p, torch.Tensor) else None
        if weight is None and bias is None:
            continue
        shared = [n for n in (weight, bias) if n is not None and len(owners[id(named[n])]) > 1]
        for n in shared:
            problems[n] = f"{n} (shared by modules {sorted(owners[id(named[n])].values())})"
        if shared:
            continue
        if kind == "conv2d" and module.groups != 1:
            raise ValueError(
                f"module {mname!r} is a grouped Conv2d (groups={module.groups}); {who} supports groups=1. "
                f"Fix: exclude its parameters with params=, or use {fix}."
            )
        if kind == "conv1d":  # weight (in, out), y = x @ W + b
            in_dim, out_dim = int(module.weight.shape[0]), int(module.weight.shape[1])
        else:  # Linear (out, in), Conv2d (out, in, kh, kw)
            out_dim, in_dim = int(module.weight.shape[0]), int(module.weight[0].numel())
        layers.append(LayerSpec(mname, module, kind, weight, bias, in_dim, out_dim))
        covered.update(n for n in (weight, bias) if n is not None)
    uncovered = [problems.get(n, n) for n in fmodel.space.names if n not in covered]
    return layers, uncovered


def input_rows(
    name: str, module: nn.Module, kind: str, x: torch.Tensor, weight: bool, bias: bool, who: str
) -> torch.Tensor:
    """A layer's input as rows ``a`` of shape ``(b, T, in')``: unfolded patches for a convolution (channel-major,
    as ``weight.reshape(out, -1)``), positions flattened otherwise; a 1 appended when the bias is in scope."""
    if kind == "conv2d":
        if x.dim() != 4:
            raise ValueError(
                f"{who} needs batched 4-D input to the Conv2d layer {name!r}, got shape {tuple(x.shape)}. "
                "Fix: give the model batches of shape (batch, channels, height, width)."
            )
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding: Any = 0
        else:
            padding = module.padding
        cols = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )
        rows = cols.transpose(1, 2)
    else:
        if x.dim() < 2:
            raise ValueError(
                f"{who} needs a leading batch axis in the input of layer {name!r}, got shape {tuple(x.shape)}. "
                "Fix: give the model batches, not single examples."
            )
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
    parts = [rows] if weight else []
    if bias:
        parts.append(torch.ones(*rows.shape[:2], 1, dtype=rows.dtype, device=rows.device))
    return torch.cat(parts, dim=-1)


def output_rows(kind: str, out_dim: int, g: torch.Tensor) -> torch.Tensor:
    """An output-shaped gradient as rows ``s`` of shape ``(b, T, out)``."""
    if kind == "conv2d":
        return g.reshape(g.shape[0], out_dim, -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def weight_decay_per_tensor(fmodel: FunctionalModel, names: list[str], who: str) -> dict[str, float]:
    """The L2 strength of each named parameter tensor (one value per tensor, which the Kronecker-structured
    routes need); ``who`` names the route in the error raised for a tensor with several strengths."""
    reg = fmodel.regularizer.to(torch.float64)
    slices = fmodel.space.slices()
    strengths = {}
    for name in names:
        values = reg[slices[name]]
        if values.numel() and not bool((values == values[0]).all()):
            raise ValueError(
                f"{who} needs one L2 strength per parameter tensor, but {name!r} has several. Fix: give the task "
                "one weight_decay per parameter name."
            )
        strengths[name] = float(values[0]) if values.numel() else 0.0
    return strengths
