"""The default scope of the layer-structured routes: the parameters they can cover, and why the others are left out.

K-FAC and EK-FAC model the curvature of the layers of :mod:`datatrace.capture.kinds` (Linear, Conv2d, Conv1d,
transformers' Conv1D) from their inputs and output gradients, caught by hooks on the module's ``forward``. On a
real network some parameters lie elsewhere: LayerNorm and BatchNorm scales, embeddings, a bare ``nn.Parameter``,
``nn.MultiheadAttention``'s packed input projection, or a Linear whose weight is used functionally (the
attention's ``out_proj``, whose ``forward`` never runs). When the user did not choose the parameters
(``params=None``), these routes cover the supported layers whose ``forward`` runs and leave the rest out, the
usual practice of the field (Grosse et al. 2023 restrict EK-FAC to the MLP and attention projections; kronfluence
tracks only the modules it supports). The influence is then that of the covered parameters: the scores are the
exact definition restricted to that block of the model (the other parameters held fixed).

Whether a module's ``forward`` runs is observed, not guessed, once some parameter is outside the supported layers
(a model made of supported layers only is taken whole, with no extra pass): one forward pass on two training
examples with hooks on every candidate, the parameters requiring gradients as in the real pass (PyTorch's inference
fast paths, e.g. ``nn.TransformerEncoderLayer`` in eval mode without gradients, skip the submodules' ``forward``).
The same pass leaves out a layer whose input does not lead with the batch axis (OPT's ``fc1``/``fc2`` run on the
examples and positions flattened together, ``(b * T, d)``): its rows cannot be told apart by example.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from datatrace.capture.engine import find_layers
from datatrace.capture.kinds import SUPPORTED_LAYERS, layer_kind
from datatrace.data import DataSource
from datatrace.gradients.functional import FunctionalModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scope:
    """The in-scope parameters a layer-structured route covers, and the others with the reason for each."""

    covered: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)

    def describe(self, limit: int = 6) -> str:
        """The left-out parameters in a line: their count and the first ``limit`` with their reasons."""
        if not self.left_out:
            return "none left out"
        shown = "; ".join(f"{name} ({why})" for name, why in list(self.left_out.items())[:limit])
        more = f"; and {len(self.left_out) - limit} more" if len(self.left_out) > limit else ""
        return f"{len(self.left_out)} parameter tensors left out: {shown}{more}"


def _owner_type(model: torch.nn.Module, name: str) -> str:
    module_name = name.rpartition(".")[0]
    try:
        return type(model.get_submodule(module_name)).__name__ if module_name else type(model).__name__
    except AttributeError:
        return "an unknown module"


def supported_scope(fmodel: FunctionalModel, data: DataSource, who: str, fix: str) -> Scope:
    """Which parameters in scope of ``fmodel`` a layer-structured route (``who``, e.g. ``"EK-FAC"``) covers on
    ``data``: those of supported layers whose own ``forward`` runs on the first training example.

    A supported module the route cannot handle (a grouped convolution) is left out with the reason; ``fix`` ends
    the errors of the layer checks that remain."""
    layers, uncovered = find_layers(fmodel, who, fix, lenient=True)
    if not uncovered:  # every parameter in a supported layer: no probe (a weight used outside its module's
        # forward is still caught by the routes' first-batch check of the hook gradients against autograd)
        return Scope(covered=tuple(fmodel.space.names))
    called: set[str] = set()
    flattened: set[str] = (
        set()
    )  # layers whose input does not lead with the batch axis (OPT's fc1 on (b*T, d))
    size = min(2, len(data))

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor, name: str) -> None:
        called.add(name)
        # the probe's batch (or one example of it: a task may check one example first) leads a batch-first input
        if (
            inputs
            and isinstance(inputs[0], torch.Tensor)
            and inputs[0].dim() > 0
            and len(inputs[0]) not in (1, size)
        ):
            flattened.add(name)

    handles = [
        layer.module.register_forward_hook(lambda *args, name=layer.name: hook(*args, name))
        for layer in layers
    ]
    try:
        theta = fmodel.theta.detach().requires_grad_(True)  # as in the real pass: no inference fast paths
        with torch.enable_grad():
            fmodel.losses(theta, fmodel.prepare(data.get(list(range(size)))))
    finally:
        for handle in handles:
            handle.remove()
    covered: list[str] = []
    left_out: dict[str, str] = {}
    for entry in uncovered:  # a name, or "name (shared by modules [...])"
        name, _, shared = entry.partition(" (")
        left_out[name] = (
            shared.rstrip(")") if shared else f"in {_owner_type(fmodel.model, name)}, not supported"
        )
    for layer in layers:
        names = [n for n in (layer.weight, layer.bias) if n is not None]
        if layer.name in flattened:
            for name in names:
                left_out[name] = (
                    f"{type(layer.module).__name__} whose input does not lead with the batch axis (the model "
                    "flattens the examples and positions together)"
                )
        elif layer.name in called:
            covered.extend(names)
        else:
            for name in names:
                left_out[name] = (
                    f"{type(layer.module).__name__} whose forward never runs: its weight is used functionally"
                )
    order = {name: i for i, name in enumerate(fmodel.space.names)}
    return Scope(
        covered=tuple(sorted(covered, key=order.__getitem__)),
        left_out={name: left_out[name] for name in sorted(left_out, key=order.__getitem__)},
    )


def untie_output_layers(fmodel: FunctionalModel) -> tuple[FunctionalModel, dict[str, str]]:
    """``fmodel`` with each supported layer whose weight is tied to other, unsupported modules (a language model's
    output layer sharing the token embedding: GPT-2's ``lm_head``) given its own copy of that weight in the private
    working model, and ``{copy's name: tied parameter's name}``; ``fmodel`` itself and ``{}`` when nothing is tied.

    The copy starts equal, so the model's function at ``theta_hat`` is unchanged; the layer-structured routes then
    cover the weight's use in the layer (the use in the other module held fixed, as every parameter outside the
    scope), which their hooks can follow, instead of leaving the output layer out. Only for the default scope and a
    scalar weight decay (a per-name decay names the tied parameter, not the copy)."""
    if isinstance(fmodel.task.weight_decay, dict):
        return fmodel, {}
    named = dict(fmodel.model.named_parameters())
    in_scope = {id(named[n]): n for n in fmodel.space.names if n in named}
    uses: dict[int, list[tuple[str, str, torch.nn.Module]]] = {}
    for mname, module in fmodel.model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None and id(p) in in_scope:
                uses.setdefault(id(p), []).append((mname, pname, module))
    untied: dict[str, str] = {}
    for pid, where in uses.items():
        layers = [u for u in where if u[1] == "weight" and layer_kind(u[2]) is not None]
        if len(where) < 2 or len(layers) != 1 or len(layers) == len(where):
            continue  # not tied, or tied between several supported layers (left out by name, as before)
        mname, pname, module = layers[0]
        weight = getattr(module, pname)
        setattr(module, pname, torch.nn.Parameter(weight.detach().clone(), requires_grad=True))
        untied[f"{mname}.{pname}" if mname else pname] = in_scope[pid]
    if not untied:
        return fmodel, {}
    return FunctionalModel(fmodel.model, fmodel.task, None, chunk_size=fmodel.chunk_size), untied


def _say(message: str, announce: bool) -> None:
    """Log ``message``, and write it on stderr too (above any progress bar) when ``announce``."""
    logger.info(message)
    if announce:
        tqdm.write(message, file=sys.stderr)


def narrow_to_supported(
    fmodel: FunctionalModel, data: DataSource, who: str, fix: str, announce: bool
) -> tuple[FunctionalModel, dict[str, str]]:
    """``fmodel`` restricted to the parameters the layer-structured ``who`` covers, and the left-out parameters
    with the reason for each; ``fmodel`` itself (and ``{}``) when nothing is left out.

    Said in one log line, and on stderr too when ``announce``; a ValueError (ending with ``fix``: the routes that
    take any parameter) when no supported layer runs. Call it only for the default scope
    (``fmodel.default_scope``): parameters the user chose are never dropped."""
    fmodel, untied = untie_output_layers(fmodel)
    scope = supported_scope(fmodel, data, who, fix)
    for copy, tied in untied.items():
        if copy in scope.covered:
            _say(
                f"datatrace: {who} covers {copy}, whose weight is tied to {tied}, through its own use in that layer "
                f"(a copy in the working model; the use elsewhere held fixed)",
                announce,
            )
    if not scope.left_out:
        return fmodel, {}
    if not scope.covered:
        raise ValueError(
            f"{who} covers {SUPPORTED_LAYERS} layers whose forward runs, and this model has none: "
            f"{scope.describe()}. Fix: {fix}."
        )
    _say(
        f"datatrace: {who} covers the {len(scope.covered)} parameter tensors of its supported layers; "
        f"{scope.describe()}. Pass params= to choose them.",
        announce,
    )
    narrowed = FunctionalModel(fmodel.model, fmodel.task, list(scope.covered), chunk_size=fmodel.chunk_size)
    return narrowed, dict(scope.left_out)


__all__ = ["Scope", "narrow_to_supported", "supported_scope", "untie_output_layers"]
