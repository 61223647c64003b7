"""One layer-capture engine: the per-layer record, forward hooks, batched backward and the hooks-vs-autograd check.

For a supported layer (:mod:`datatrace.capture.kinds`) the gradient of a root ``r(theta)`` (a loss, or outputs
contracted with a cotangent column ``c``) with respect to its ``(out, in')`` parameter matrix is

    d <c, r> / dW = sum_t s_t a_t^T,    s_t = d <c, r> / d y_t,

with ``a_t`` the layer's input rows (a 1 appended when the bias is in scope) caught by a forward hook and ``s_t``
the gradient of its output, obtained for many columns ``c`` at once by one vmapped backward pass
(``is_grads_batched``; Grosse & Martens 2016 for convolutions). K-FAC/EK-FAC (:mod:`datatrace.curvature.kfac`)
and the factorised projection (:mod:`datatrace.projection.factorized`) both consume these rows; what they do
with them stays in the route. On the first batch :func:`check_gradients` rebuilds the batch gradient from the
rows and compares it with autograd's, which catches weights used outside their module's forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from datatrace.capture.kinds import LayerKind, layer_kind
from datatrace.data import batch_length
from datatrace.gradients.functional import FunctionalModel

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_ELEMENTS",
    "Backprop",
    "Layer",
    "Recording",
    "check_gradients",
    "find_layers",
    "first_nonfinite",
    "per_example_gradient_sums",
    "per_example_gradients",
    "recording",
]

#: a batched backward pass produces at most this many elements of output gradients at once
CHUNK_ELEMENTS = 2**24


@dataclass
class Layer:
    """A supported module with at least one parameter in scope (names as in ``fmodel.space``).

    Its parameters in scope, as one ``(out, in')`` matrix ``[W, b]`` (``in' = in + 1`` with the bias), are the
    layout every route works in: :meth:`gather` and :meth:`scatter` convert from and to parameter tensors.
    """

    name: str
    module: nn.Module
    spec: LayerKind  # the entry of the kinds table: row builders and weight layout
    weight: str | None
    bias: str | None
    in_dim: int  # width of the input patch, without the bias column
    out_dim: int

    @property
    def kind(self) -> str:
        """The kind's name (``"linear"``, ``"conv2d"``, ``"conv1d"``...)."""
        return self.spec.name

    @property
    def a_dim(self) -> int:
        """Width ``in'`` of an input row: the weight's inputs (if in scope), plus 1 for the bias (if in scope)."""
        return (self.in_dim if self.weight is not None else 0) + (1 if self.bias is not None else 0)

    @property
    def params(self) -> list[str]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def gather(self, blocks: Mapping[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Named parameter-shaped tensors with ``lead`` leading axes -> ``(*lead, out, in')``."""
        parts = []
        if self.weight is not None:
            parts.append(self.spec.weight_matrix(blocks[self.weight], lead, self.out_dim, self.in_dim))
        if self.bias is not None:
            parts.append(blocks[self.bias].unsqueeze(-1))
        return torch.cat(parts, dim=-1)

    def scatter(self, matrix: torch.Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`gather`: ``(*lead, out, in')`` -> named tensors of the parameters' shapes."""
        out: dict[str, torch.Tensor] = {}
        if self.weight is not None:
            out[self.weight] = self.spec.weight_from_matrix(matrix[..., : self.in_dim], shapes[self.weight])
        if self.bias is not None:
            out[self.bias] = matrix[..., -1]
        return out

    def input_rows(self, x: torch.Tensor, who: str) -> torch.Tensor:
        """The layer's input as rows ``a``, shape ``(b, T, in')`` (a 1 appended when the bias is in scope)."""
        rows = self.spec.input_rows(self.name, self.module, x, who)
        parts = [rows] if self.weight is not None else []
        if self.bias is not None:
            parts.append(torch.ones(*rows.shape[:2], 1, dtype=rows.dtype, device=rows.device))
        return torch.cat(parts, dim=-1)

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        """An output-shaped gradient as rows ``s``, shape ``(b, T, out)``."""
        return self.spec.output_rows(self.out_dim, g)


L = TypeVar("L", bound=Layer)


def find_layers(
    fmodel: FunctionalModel, who: str, fix: str, layer_type: type[L] = Layer, lenient: bool = False
) -> tuple[list[L], list[str]]:
    """Supported layers owning parameters in scope (model order, as ``layer_type``), and the in-scope parameters
    they do not cover (those shared by several modules, or of a module its kind cannot handle, described as such:
    ``"name (reason)"``).

    A module that its kind cannot handle (a grouped convolution) raises a ValueError naming ``who`` (the route)
    and ending with ``fix``; with ``lenient`` its parameters are listed as not covered instead (a default scope
    that leaves them out).
    """
    named = dict(fmodel.model.named_parameters())
    in_scope = {id(named[n]): n for n in fmodel.space.names if n in named}
    owners: dict[int, dict[int, str]] = {}  # id(parameter) -> {id(module): module name}
    for mname, module in fmodel.model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None and id(p) in in_scope:
                owners.setdefault(id(p), {}).setdefault(id(module), mname)
    layers: list[L] = []
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
        if kind.check is not None:
            try:
                kind.check(mname, module, who, fix)
            except ValueError as err:
                if not lenient:
                    raise
                reason = str(err).split(". Fix:")[0].split("; ")[0].removeprefix(f"module {mname!r} is a ")
                for n in (weight, bias):
                    if n is not None:
                        problems[n] = f"{n} ({reason}: not supported)"
                continue
        in_dim, out_dim = kind.widths(module)
        layers.append(layer_type(mname, module, kind, weight, bias, in_dim, out_dim))
        covered.update(n for n in (weight, bias) if n is not None)
    uncovered = [problems.get(n, n) for n in fmodel.space.names if n not in covered]
    return layers, uncovered


# -- forward: hooks ----------------------------------------------------------------------------------------------------


@dataclass
class Recording:
    """What the forward hooks saw: per layer, ``(input rows a, output tensor)`` of every call, and the layer index
    of each call in forward order."""

    calls: list[list[tuple[torch.Tensor, torch.Tensor]]]
    order: list[int] = field(default_factory=list)

    def outputs(self) -> list[torch.Tensor]:
        """The outputs of every call that autograd can differentiate, layer by layer (the targets of backward)."""
        return [out for layer_calls in self.calls for _, out in layer_calls if out.requires_grad]

    def inputs(self, i: int) -> torch.Tensor | None:
        """Layer ``i``'s input rows of all its calls, ``(b, T_total, in')`` (calls as further locations)."""
        if not self.calls[i]:
            return None
        return torch.cat([a for a, _ in self.calls[i]], dim=1)

    def output_rows(
        self, layers: list[Layer], grads: tuple[torch.Tensor | None, ...], columns: int
    ) -> list[torch.Tensor | None]:
        """Per layer, the rows ``s`` of all its calls, ``(columns, b, T_total, out)``, from the gradients of
        :meth:`outputs` stacked over ``columns`` (zeros where an output does not depend on the root)."""
        it = iter(grads)
        rows_per_layer: list[torch.Tensor | None] = []
        for layer, layer_calls in zip(layers, self.calls):
            rows = []
            for _, out in layer_calls:
                g = next(it) if out.requires_grad else None
                if g is None:
                    g = torch.zeros(columns, *out.shape, dtype=out.dtype, device=out.device)
                s = layer.output_rows(g.detach().reshape(columns * out.shape[0], *out.shape[1:]))
                rows.append(s.reshape(columns, out.shape[0], -1, layer.out_dim))
            rows_per_layer.append(torch.cat(rows, dim=2) if rows else None)
        return rows_per_layer


@contextmanager
def recording(layers: list[Layer], who: str) -> Iterator[Recording]:
    """Forward hooks recording every call of every layer into a :class:`Recording`; always removed, also when the
    forward pass raises. ``who`` names the route in the errors of the row builders."""
    rec = Recording([[] for _ in layers])
    handles = []
    try:
        for i, layer in enumerate(layers):

            def hook(
                module: nn.Module, inputs: tuple, output: torch.Tensor, i: int = i, layer: Layer = layer
            ) -> None:
                rec.calls[i].append((layer.input_rows(inputs[0].detach(), who), output))
                rec.order.append(i)

            handles.append(layer.module.register_forward_hook(hook))
        yield rec
    finally:
        for h in handles:
            h.remove()


def first_nonfinite(layers: list[Layer], rec: Recording) -> str:
    """Where the first non-finite value of a forward pass appears, in words (for an error message)."""
    seen = [0] * len(layers)
    for i in rec.order:
        a, out = rec.calls[i][seen[i]]
        seen[i] += 1
        layer = layers[i]
        if not bool(torch.isfinite(a).all()):
            return f"at the input of layer {layer.name!r} ({type(layer.module).__name__})"
        if not bool(torch.isfinite(out.detach()).all()):
            return (
                f"in layer {layer.name!r} ({type(layer.module).__name__}, parameters {layer.params}): its input "
                "is finite but its output is not"
            )
    if rec.order:
        return "after the last supported layer (check the modules and the loss after it)"
    return "before any supported layer (check the data and the modules before it)"


# -- backward: output gradients for many columns -------------------------------------------------------------------------


class Backprop:
    """Backpropagates many cotangent columns of a root through the recorded outputs.

    Columns go in chunks of bounded memory, each one vmapped backward pass (``is_grads_batched``); where an
    operation of the model has no batching rule, one pass per column from then on (remembered by this object).
    """

    def __init__(self, who: str, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.who = who
        self.chunk_elements = chunk_elements
        self.batched = True

    def chunks(
        self, root: torch.Tensor, targets: list[torch.Tensor], columns: torch.Tensor
    ) -> Iterator[tuple[int, int, tuple[torch.Tensor | None, ...]]]:
        """``(start, count, grads)`` for consecutive chunks of ``columns`` (shape ``(c, *root.shape)``):
        ``grads[j]`` is ``d <columns[start:start+count], root> / d targets[j]`` stacked on a leading axis of
        length ``count`` (None where the target does not depend on the root)."""
        c = columns.shape[0]
        if c == 0:
            return
        if not targets:
            yield 0, c, ()
            return
        chunk = max(1, self.chunk_elements // max(1, sum(t.numel() for t in targets)))
        i = 0
        while i < c:
            if self.batched and c - i > 1 and chunk > 1:
                count = min(chunk, c - i)
                try:
                    grads = torch.autograd.grad(
                        root,
                        targets,
                        grad_outputs=columns[i : i + count],
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                except RuntimeError as err:  # an op without a batching rule: one pass per column from now on
                    logger.info(
                        "%s: batched backward failed (%s); backpropagating columns one by one.", self.who, err
                    )
                    self.batched = False
                else:
                    yield i, count, grads
                    i += count
                    continue
            grads = torch.autograd.grad(
                root, targets, grad_outputs=columns[i], retain_graph=True, allow_unused=True
            )
            yield i, 1, tuple(None if g is None else g.unsqueeze(0) for g in grads)
            i += 1


# -- per-example gradients from the hooks --------------------------------------------------------------------------


def _hooked_layer_rows(
    layers: list[Layer], fn: nn.Module, batch: tuple | dict
) -> Iterator[tuple[Layer, torch.Tensor, torch.Tensor]]:
    """One forward pass of ``fn(batch)`` (one value per example) with hooks and one backward pass of the summed
    values; then, per layer reached, ``(layer, s, a)``: its output-gradient rows ``(b, T, out)`` and input
    rows ``(b, T, in')``, so that example ``i``'s gradient is ``G_i = sum_t s_it a_it^T``."""
    with torch.enable_grad(), recording(layers, "per-example gradients") as rec:
        values = fn(batch)
    b = values.shape[0] if values.dim() else 0
    if values.shape != (b,) or b == 0:
        raise ValueError(
            f"the task returned shape {tuple(values.shape)}; loss and measurement must return one value per "
            "example, shape (batch_size,). Fix: use reduction='none' and do not average over the batch."
        )
    live = rec.outputs()
    if not live or not values.requires_grad:
        return
    grads = torch.autograd.grad(values.sum(), live, allow_unused=True)
    for i, (layer, s_rows) in enumerate(zip(layers, rec.output_rows(layers, grads, 1))):
        a = rec.inputs(i)
        if a is None or s_rows is None:
            continue
        if a.shape[0] != b:
            raise ValueError(
                f"layer {layer.name!r} saw {a.shape[0]} rows for a batch of {b} examples: per-example "
                "gradients from hooks need the batch axis first in every supported layer's input"
            )
        yield layer, s_rows[0], a


def per_example_gradients(
    fmodel: FunctionalModel, layers: list[Layer], fn: nn.Module, batch: tuple | dict
) -> torch.Tensor:
    """The ``(b, p)`` per-example gradients of ``fn(batch)`` (one value per example, e.g. a
    :class:`~datatrace.gradients.functional.BoundFunction` of the task's loss) from one forward pass with hooks and
    one backward pass of the summed values: ``G_i = sum_t s_it a_it^T`` per layer. Every parameter in scope must
    belong to ``layers`` and the examples must be independent (eval mode), which the caller checks once against
    the per-example rows (:meth:`FunctionalModel.per_example_grads` does)."""
    shapes = dict(zip(fmodel.space.names, fmodel.space.shapes))
    b = batch_length(batch)
    blocks = {
        n: torch.zeros(b, *shape, dtype=fmodel.dtype, device=fmodel.device) for n, shape in shapes.items()
    }
    for layer, s, a in _hooked_layer_rows(layers, fn, batch):
        gradient = torch.einsum("bto,bti->boi", s, a)  # (b, out, in')
        blocks.update({n: g.to(fmodel.dtype) for n, g in layer.scatter(gradient, shapes).items()})
    return fmodel.space.flatten(blocks, batch_dims=1)


def per_example_gradient_sums(
    fmodel: FunctionalModel, layers: list[Layer], fn: nn.Module, batch: tuple | dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i G_i, ||G_i||)``: the summed gradient ``(p,)`` and the per-example gradient norms ``(b,)`` of the
    values of :func:`per_example_gradients`, without its ``b x p`` rows: each layer's ``(b, out, in')`` blocks
    are formed a few examples at a time (:data:`CHUNK_ELEMENTS`) and dropped."""
    shapes = dict(zip(fmodel.space.names, fmodel.space.shapes))
    b = batch_length(batch)
    total = {n: torch.zeros(shape, dtype=torch.float64, device=fmodel.device) for n, shape in shapes.items()}
    squares = torch.zeros(b, dtype=torch.float64, device=fmodel.device)
    for layer, s, a in _hooked_layer_rows(layers, fn, batch):
        summed = torch.einsum("bto,bti->oi", s, a).to(torch.float64)
        total.update(layer.scatter(summed, shapes))
        step = max(1, CHUNK_ELEMENTS // max(1, layer.out_dim * a.shape[-1]))
        for start in range(0, b, step):
            g = torch.einsum("bto,bti->boi", s[start : start + step], a[start : start + step])
            squares[start : start + step] += g.square_().sum(dim=(1, 2)).to(torch.float64)
    return fmodel.space.flatten(total), squares.sqrt()


# -- the self-check ------------------------------------------------------------------------------------------------------


def check_gradients(
    fmodel: FunctionalModel,
    layers: list[Layer],
    rec: Recording,
    root: torch.Tensor,
    column: torch.Tensor,
    who: str,
    fix: str,
    skip_nonfinite: bool,
) -> None:
    """The gradient of ``<column, root>`` rebuilt from the hooks' rows, ``sum_{b,t} s a^T``, must equal autograd's
    within ``rtol = min(0.1, max(1e-10, 1e3 eps))`` relative to ``max(sum ||s|| ||a||, ||grad||)``; a ValueError
    naming the layer otherwise (weights used outside their module's forward, input or output not batch-first).

    ``skip_nonfinite``: leave layers with non-finite statistics to the caller's own diagnosis.
    """
    params = dict(fmodel.model.named_parameters())
    names = [n for layer in layers for n in layer.params]
    live = rec.outputs()
    if not names:
        return
    grads = torch.autograd.grad(
        root, [*live, *(params[n] for n in names)], grad_outputs=column, retain_graph=True, allow_unused=True
    )
    s_rows = rec.output_rows(layers, grads[: len(live)], 1)
    param_grads = dict(zip(names, grads[len(live) :]))
    eps = torch.finfo(fmodel.dtype).eps
    rtol = min(0.1, max(1e-10, 1e3 * eps))
    for i, layer in enumerate(layers):
        blocks = {
            n: (g if g is not None else torch.zeros_like(params[n])).detach() for n, g in param_grads.items()
        }
        true = layer.gather({n: blocks[n] for n in layer.params}, lead=0).to(torch.float64)
        a, s = rec.inputs(i), s_rows[i]
        if a is not None and s is not None:
            a, s = a.to(torch.float64), s[0].to(torch.float64)
            rebuilt = torch.einsum("bto,bti->oi", s, a)
            scale = float((s.norm(dim=-1) * a.norm(dim=-1)).sum())
        else:
            rebuilt, scale = torch.zeros_like(true), 0.0
        error = float((rebuilt - true).norm())
        if skip_nonfinite and not (math.isfinite(error) and math.isfinite(scale)):
            continue
        if not error <= rtol * max(scale, float(true.norm())) + 1e-300:
            raise ValueError(
                f"{who}'s hooks on layer {layer.name!r} do not reproduce the gradient of its parameters "
                f"{layer.params} (error {error:.3g} relative to {max(scale, float(true.norm())):.3g}): the "
                "parameters are used outside the module's own forward (weight tying, a functional call, a "
                "parametrisation), or the layer's input/output is not batch-first. Fix: exclude them with "
                f"params=, or {fix}."
            )
