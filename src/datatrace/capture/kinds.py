"""The table of layer kinds whose per-example gradients factorise as ``s a^T``.

For ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` (groups=1) and Hugging Face's ``Conv1D`` the gradient of a layer's weight is
``sum_t s_t a_t^T`` over positions ``t`` (tokens, or spatial locations of a convolution, Grosse & Martens 2016),
with ``a`` the input rows (unfolded patches for a convolution, a 1 appended for the bias by the engine) and ``s``
the gradient with respect to the layer's output. Each :class:`LayerKind` says, for one module type, how wide the
rows are, how to build them (:attr:`LayerKind.input_rows`, :attr:`LayerKind.output_rows`) and how the weight maps
to the ``(out, in)`` matrix ``W`` of ``y = W a``. Adding a layer type is one entry in :data:`KINDS` plus its two
row builders; :mod:`datatrace.capture.engine` and the routes built on it need no other change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datatrace.gradients.functional import FunctionalModel

__all__ = [
    "KINDS",
    "KINDS_BY_CLASS_NAME",
    "SUPPORTED_LAYERS",
    "LayerKind",
    "layer_kind",
    "weight_decay_per_tensor",
]

#: input rows ``(b, T, in)`` from (layer name, module, input tensor, route name for errors)
InputRows = Callable[[str, nn.Module, torch.Tensor, str], torch.Tensor]
#: output rows ``(b, T, out)`` from (out width, an output-shaped gradient)
OutputRows = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerKind:
    """One supported module type: its name (kept in fingerprints), widths, row builders and weight layout.

    ``transposed``: the weight is stored ``(in, out)`` (``y = x @ W + b``) instead of torch's ``(out, in, ...)``.
    ``check``: raises for a module of this type that the capture cannot handle (e.g. a grouped convolution).
    """

    name: str
    input_rows: InputRows
    output_rows: OutputRows
    transposed: bool = False
    check: Callable[[str, nn.Module, str, str], None] | None = None

    def widths(self, module: nn.Module) -> tuple[int, int]:
        """``(in, out)``: the width of an input row (without the bias column) and of an output row."""
        if self.transposed:
            return int(module.weight.shape[0]), int(module.weight.shape[1])
        return int(module.weight[0].numel()), int(module.weight.shape[0])

    def weight_matrix(self, w: torch.Tensor, lead: int, out_dim: int, in_dim: int) -> torch.Tensor:
        """A weight-shaped tensor with ``lead`` leading axes -> ``(*lead, out, in)``."""
        if self.transposed:
            return w.transpose(-1, -2)
        return w.reshape(*w.shape[:lead], out_dim, in_dim)

    def weight_from_matrix(self, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix`: ``(*lead, out, in)`` -> ``(*lead, *shape)``."""
        if self.transposed:
            matrix = matrix.transpose(-1, -2)
        return matrix.reshape(*matrix.shape[:-2], *shape)


# -- row builders ----------------------------------------------------------------------------------------------------


def dense_input_rows(name: str, module: nn.Module, x: torch.Tensor, who: str) -> torch.Tensor:
    """A dense layer's input with positions flattened: ``(b, ..., in) -> (b, T, in)``."""
    if x.dim() < 2:
        raise ValueError(
            f"{who} needs a leading batch axis in the input of layer {name!r}, got shape {tuple(x.shape)}. "
            "Fix: give the model batches, not single examples."
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])


def dense_output_rows(out_dim: int, g: torch.Tensor) -> torch.Tensor:
    """A dense layer's output gradient with positions flattened: ``(b, ..., out) -> (b, T, out)``."""
    return g.reshape(g.shape[0], -1, g.shape[-1])


def conv2d_input_rows(name: str, module: nn.Module, x: torch.Tensor, who: str) -> torch.Tensor:
    """A Conv2d's input as unfolded patches ``(b, T, in*kh*kw)``, channel-major as ``weight.reshape(out, -1)``."""
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
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


def conv1d_input_rows(name: str, module: nn.Module, x: torch.Tensor, who: str) -> torch.Tensor:
    """An nn.Conv1d's input as unfolded patches ``(b, T, in*k)``, channel-major as ``weight.reshape(out, -1)``."""
    if x.dim() != 3:
        raise ValueError(
            f"{who} needs batched 3-D input to the Conv1d layer {name!r}, got shape {tuple(x.shape)}. "
            "Fix: give the model batches of shape (batch, channels, length)."
        )
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    else:
        padding = module.padding[0]
    cols = F.unfold(
        x.unsqueeze(2),
        (1, module.kernel_size[0]),
        dilation=(1, module.dilation[0]),
        padding=(0, padding),
        stride=(1, module.stride[0]),
    )
    return cols.transpose(1, 2)


def conv_output_rows(out_dim: int, g: torch.Tensor) -> torch.Tensor:
    """A convolution's output gradient ``(b, out, *spatial)`` as rows ``(b, T, out)``."""
    return g.reshape(g.shape[0], out_dim, -1).transpose(1, 2)


def check_ungrouped(name: str, module: nn.Module, who: str, fix: str) -> None:
    if module.groups != 1:
        raise ValueError(
            f"module {name!r} is a grouped {type(module).__name__} (groups={module.groups}); {who} supports "
            f"groups=1. Fix: exclude its parameters with params=, or {fix}."
        )


LINEAR = LayerKind("linear", dense_input_rows, dense_output_rows)
CONV2D = LayerKind("conv2d", conv2d_input_rows, conv_output_rows, check=check_ungrouped)
CONV1D = LayerKind("torch_conv1d", conv1d_input_rows, conv_output_rows, check=check_ungrouped)
#: Hugging Face's transposed dense layer (``transformers.pytorch_utils.Conv1D``, weight ``(in, out)``)
HF_CONV1D = LayerKind("conv1d", dense_input_rows, dense_output_rows, transposed=True)

#: supported module types (subclasses included)
KINDS: dict[type[nn.Module], LayerKind] = {nn.Linear: LINEAR, nn.Conv2d: CONV2D, nn.Conv1d: CONV1D}
#: kinds recognised by class name, for types of optional packages that datatrace does not import
KINDS_BY_CLASS_NAME: dict[str, LayerKind] = {"Conv1D": HF_CONV1D}

SUPPORTED_LAYERS = "nn.Linear, nn.Conv2d and nn.Conv1d (groups=1), and transformers' Conv1D"


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The :class:`LayerKind` of ``module`` (looked up along its class hierarchy), or None if unsupported."""
    for cls in type(module).__mro__:
        kind = KINDS.get(cls)
        if kind is not None:
            return kind
    kind = KINDS_BY_CLASS_NAME.get(type(module).__name__)
    weight = getattr(module, "weight", None)
    if kind is HF_CONV1D and not (
        hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2
    ):
        return None
    return kind


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
