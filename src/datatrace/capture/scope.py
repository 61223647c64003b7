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
(a model made of supported layers only is taken whole, with no extra pass): one forward pass on one training
example with hooks on every candidate, the parameters requiring gradients as in the real pass (PyTorch's inference
fast paths, e.g. ``nn.TransformerEncoderLayer`` in eval mode without gradients, skip the submodules' ``forward``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from datatrace.capture.engine import find_layers
from datatrace.capture.kinds import SUPPORTED_LAYERS
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

    ``fix`` ends the error raised when a supported module cannot be handled (a grouped convolution)."""
    layers, uncovered = find_layers(fmodel, who, fix)
    if not uncovered:  # every parameter in a supported layer: no probe (a weight used outside its module's
        # forward is still caught by the routes' first-batch check of the hook gradients against autograd)
        return Scope(covered=tuple(fmodel.space.names))
    called: set[str] = set()
    handles = [
        layer.module.register_forward_hook(lambda *_, name=layer.name: called.add(name)) for layer in layers
    ]
    try:
        theta = fmodel.theta.detach().requires_grad_(True)  # as in the real pass: no inference fast paths
        with torch.enable_grad():
            fmodel.losses(theta, fmodel.prepare(data.get([0])))
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
        if layer.name in called:
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


def narrow_to_supported(
    fmodel: FunctionalModel, data: DataSource, who: str, fix: str, announce: bool
) -> tuple[FunctionalModel, dict[str, str]]:
    """``fmodel`` restricted to the parameters the layer-structured ``who`` covers, and the left-out parameters
    with the reason for each; ``fmodel`` itself (and ``{}``) when nothing is left out.

    Said in one log line, and on stderr too when ``announce``; a ValueError (ending with ``fix``: the routes that
    take any parameter) when no supported layer runs. Call it only for the default scope
    (``fmodel.default_scope``): parameters the user chose are never dropped."""
    scope = supported_scope(fmodel, data, who, fix)
    if not scope.left_out:
        return fmodel, {}
    if not scope.covered:
        raise ValueError(
            f"{who} covers {SUPPORTED_LAYERS} layers whose forward runs, and this model has none: "
            f"{scope.describe()}. Fix: {fix}."
        )
    message = (
        f"datatrace: {who} covers the {len(scope.covered)} parameter tensors of its supported layers; "
        f"{scope.describe()}. Pass params= to choose them."
    )
    logger.info(message)
    if announce:
        tqdm.write(message, file=sys.stderr)
    narrowed = FunctionalModel(fmodel.model, fmodel.task, list(scope.covered), chunk_size=fmodel.chunk_size)
    return narrowed, dict(scope.left_out)


__all__ = ["Scope", "narrow_to_supported", "supported_scope"]
