"""LoGra: seeded random projections of per-example gradients, factorised per layer (Choe et al. 2024, "What is
your data worth to GPT?").

For a supported layer ``y = W a + b`` (:mod:`datatrace.capture.kinds`) the per-example gradient is
``G_i = sum_t s_it a_it^T`` (``s = dl/dy``, ``t`` over tokens / positions / pixels; the bias is an extra input
column fixed at 1). With one projection per side, ``P_in`` (``d_in x k_in``) and ``P_out`` (``d_out x k_out``),

    P_out^T G_i P_in = sum_t (P_out^T s_it) (P_in^T a_it)^T          (k_out x k_in)

which equals the Kronecker projection ``(P_out (x) P_in)^T vec(G_i)`` (row-major ``vec``) of the full per-example
gradient, but is computed from the layer's input activations and output gradients, caught by the capture engine's
hooks (:mod:`datatrace.capture.engine`), without ever forming ``G_i``. A side whose width is at most the requested
dimension is not projected (the identity, exact). ``dim_in`` / ``dim_out="auto"`` choose one width for both sides
so that the total dimension meets the Johnson-Lindenstrauss bound of :func:`~datatrace.projection.random.jl_dim`.
The matrices are drawn as in :mod:`datatrace.projection.random`, one derived seed per layer and side.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from datatrace.capture.engine import Backprop, Layer, check_gradients, recording
from datatrace.capture.engine import find_layers as engine_find_layers
from datatrace.capture.kinds import SUPPORTED_LAYERS, weight_decay_per_tensor
from datatrace.errors import bad_value, check_choice, check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.projection.random import (
    DEFAULT_EPS,
    DEFAULT_MAX_DIM,
    PROJECTION_KINDS,
    ROOTS,
    Cotangents,
    Projector,
    check_density,
    check_dim,
    check_seed,
    cotangents_for,
    derive_seed,
    jl_dim,
    random_matrix,
)

logger = logging.getLogger(__name__)

WHO = "FactorizedProjector"


@dataclass
class ProjectedLayer(Layer):
    """A supported layer (:class:`~datatrace.capture.engine.Layer`) and its two side projections (``None``:
    identity)."""

    k_in: int = 0
    k_out: int = 0
    P_in: torch.Tensor | None = None  # (d_in', k_in)
    P_out: torch.Tensor | None = None  # (d_out, k_out)
    offset: int = 0  # first feature of this layer in the projected vector

    @property
    def d_in(self) -> int:
        """Input width without the bias column."""
        return self.in_dim

    @property
    def d_out(self) -> int:
        return self.out_dim

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out

    def project_matrix(self, M: torch.Tensor) -> torch.Tensor:
        """``P_out^T M P_in`` for ``M`` of shape ``(..., d_out, d_in')``."""
        if self.P_out is not None:
            M = self.P_out.T @ M
        if self.P_in is not None:
            M = M @ self.P_in
        return M


def find_layers(fmodel: FunctionalModel) -> list[ProjectedLayer]:
    """The supported modules owning the parameters in scope, in model order; a ValueError names any parameter in
    scope that no supported module owns (or that two modules share)."""
    layers, missing = engine_find_layers(fmodel, WHO, "use RandomProjector", ProjectedLayer)
    if missing:
        raise bad_value(
            "projector",
            WHO,
            f"it projects parameters of {SUPPORTED_LAYERS} only, each owned by one module, but these parameters in "
            f"scope are not: {missing[:12]}{' ...' if len(missing) > 12 else ''}",
            "exclude them with params= (e.g. params="
            f"{[layer.name for layer in layers][:4] or ['<layer name>']}), or use RandomProjector",
        )
    return layers


def supports_factorized(fmodel: FunctionalModel) -> bool:
    """Whether every parameter in scope belongs to a layer the :class:`FactorizedProjector` supports."""
    try:
        find_layers(fmodel)
    except ValueError:
        return False
    return True


class FactorizedProjector(Projector):
    """LoGra: per supported layer, project input activations (``d_in -> k_in``) and output gradients
    (``d_out -> k_out``) separately; the projected per-example gradient ``P_out^T G_i P_in`` is never formed in full.

    Args:
        dim_in: ``k_in`` per layer, or ``"auto"``. dim_out: ``k_out`` per layer, or ``"auto"`` (with ``"auto"`` both
            sides get the largest common width whose total dimension stays within the Johnson-Lindenstrauss bound
            for the training set, capped at ``max_dim``). A side no wider than its dimension is not projected.
        kind, random_state, eps, max_dim: as :class:`RandomProjector`; ``density="auto"`` is ``1/sqrt(d)`` per side.

    After :meth:`fit`: ``layers_`` (:class:`ProjectedLayer` with ``P_in``, ``P_out``, ``k_in``, ``k_out``), ``dim_``.
    The projected vector is the concatenation over layers (model order) of the row-major ``(k_out, k_in)`` matrices.
    """

    def __init__(
        self,
        dim_in: int | str = "auto",
        dim_out: int | str = "auto",
        kind: str = "gaussian",
        random_state: int = 0,
        *,
        eps: float = DEFAULT_EPS,
        max_dim: int = DEFAULT_MAX_DIM,
        density: float | str = "auto",
    ) -> None:
        self.dim_in = check_dim("dim_in", dim_in)
        self.dim_out = check_dim("dim_out", dim_out)
        self.kind = check_choice("kind", kind, PROJECTION_KINDS)
        self.random_state = check_seed(random_state)
        jl_dim(2, eps)
        self.eps = eps
        self.max_dim = check_positive_int("max_dim", max_dim)
        self.density = check_density(density)

    def __repr__(self) -> str:
        return (
            f"FactorizedProjector(dim_in={self.dim_in!r}, dim_out={self.dim_out!r}, kind={self.kind!r}, "
            f"random_state={self.random_state!r})"
        )

    def fit(self, fmodel: FunctionalModel, n_points: int) -> FactorizedProjector:
        layers = find_layers(fmodel)
        if "auto" in (self.dim_in, self.dim_out):
            full = sum(layer.a_dim * layer.d_out for layer in layers)
            bound = jl_dim(n_points, self.eps)
            target = min(bound, self.max_dim, full)
            widest = max(max(layer.a_dim, layer.d_out) for layer in layers)

            def total(width: int) -> int:
                ki = width if self.dim_in == "auto" else self.dim_in
                ko = width if self.dim_out == "auto" else self.dim_out
                return sum(min(ki, layer.a_dim) * min(ko, layer.d_out) for layer in layers)

            lo, hi = 1, widest
            while lo < hi:  # largest width with total(width) <= target (total is non-decreasing)
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if total(mid) <= target else (lo, mid - 1)
            width = lo
            dims = (
                width if self.dim_in == "auto" else self.dim_in,
                width if self.dim_out == "auto" else self.dim_out,
            )
            logger.info(
                "FactorizedProjector('auto'): Johnson-Lindenstrauss bound %d for n=%d, eps=%g, capped at max_dim=%d "
                "and the %d unprojected features -> side width %d, total dimension %d.",
                bound,
                n_points,
                self.eps,
                self.max_dim,
                full,
                width,
                total(width),
            )
        else:
            dims = (int(self.dim_in), int(self.dim_out))
        offset = 0
        for layer in layers:
            layer.k_in = min(dims[0], layer.a_dim)
            layer.k_out = min(dims[1], layer.d_out)
            for side, d, k in (("in", layer.a_dim, layer.k_in), ("out", layer.d_out, layer.k_out)):
                if k >= d:
                    mat = None
                else:
                    density = (
                        (1.0 / math.sqrt(d) if self.density == "auto" else float(self.density))
                        if self.kind == "sparse"
                        else 1.0
                    )
                    seed = derive_seed(self.random_state, "factorized", self.kind, layer.name, side, d, k)
                    mat = random_matrix(d, k, self.kind, seed, density).to(
                        device=fmodel.device, dtype=fmodel.dtype
                    )
                setattr(layer, f"P_{side}", mat)
            layer.offset = offset
            offset += layer.dim
        self.fmodel_ = fmodel
        self.layers_ = layers
        self.dim_ = offset
        self._checked = False
        self._backprop = Backprop(WHO)
        return self

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        space = self.fmodel_.space
        if vectors.dim() != 2 or vectors.shape[1] != space.numel:
            raise bad_value(
                "vectors",
                vectors,
                f"expected shape (m, {space.numel}) in the flat parameter layout",
                "reshape",
            )
        v = vectors.to(device=self.fmodel_.device, dtype=self.fmodel_.dtype)
        blocks = space.unflatten(v)
        parts = [
            layer.project_matrix(layer.gather(blocks, lead=1)).reshape(v.shape[0], -1)
            for layer in self.layers_
        ]
        return torch.cat(parts, dim=1)

    def project_vjps(
        self, batch: tuple, root: str = "loss", cotangents: Cotangents | None = None
    ) -> torch.Tensor:
        self._check_fitted()
        check_choice("root", root, ROOTS)
        fmodel, layers = self.fmodel_, self.layers_
        task = fmodel.task
        fn = {"outputs": task.outputs, "loss": task.loss, "measurement": task.measurement}[root]
        with torch.enable_grad(), recording(layers, WHO) as rec:
            outputs = fn(fmodel.model, batch)
        b = outputs.shape[0]
        cot = cotangents_for(root, outputs, cotangents)  # (b, c, K)
        flat = outputs.reshape(b, -1)
        live = rec.outputs()
        result = torch.zeros(b, cot.shape[1], self.dim_, dtype=fmodel.dtype, device=fmodel.device)
        if not flat.requires_grad or not live:
            return result
        inputs = []
        for i, layer in enumerate(layers):
            a = rec.inputs(i)  # (b, T, d_in')
            if a is not None and a.shape[0] != b:
                raise ValueError(
                    f"layer {layer.name!r} saw {a.shape[0]} rows for a batch of {b} examples: the "
                    "FactorizedProjector needs the batch axis first in every supported layer's input. Fix: "
                    "exclude this layer with params=, or use RandomProjector."
                )
            inputs.append(None if a is None else (a @ layer.P_in if layer.P_in is not None else a))
        columns = cot.transpose(0, 1).contiguous()  # (c, b, K)
        for start, count, grads in self._backprop.chunks(flat, live, columns):
            for layer, a_p, s in zip(layers, inputs, rec.output_rows(layers, grads, count)):
                if a_p is None:
                    continue
                s_p = s @ layer.P_out if layer.P_out is not None else s
                feat = torch.einsum("cbto,bti->bcoi", s_p, a_p).reshape(b, count, -1)
                result[:, start : start + count, layer.offset : layer.offset + layer.dim] = feat
        if not self._checked:
            check_gradients(
                fmodel, layers, rec, flat, cot[:, 0], WHO, "use RandomProjector", skip_nonfinite=False
            )
            self._checked = True
        return result

    def regularizer_matrix(self, rescaled: bool = False) -> torch.Tensor:
        self._check_fitted()
        fmodel = self.fmodel_
        out = torch.zeros(self.dim_, self.dim_, dtype=torch.float64, device=fmodel.device)
        for layer in self.layers_:
            lam = weight_decay_per_tensor(fmodel, layer.params, WHO)
            diag_in = torch.cat(
                ([torch.full((layer.d_in,), lam[layer.weight], dtype=torch.float64)] if layer.weight else [])
                + ([torch.full((1,), lam[layer.bias], dtype=torch.float64)] if layer.bias else [])
            ).to(fmodel.device)
            if not bool((diag_in != 0).any()):
                continue
            P_in = (
                layer.P_in.to(torch.float64)
                if layer.P_in is not None
                else torch.eye(layer.a_dim, dtype=torch.float64, device=fmodel.device)
            )
            P_out = (
                layer.P_out.to(torch.float64)
                if layer.P_out is not None
                else torch.eye(layer.d_out, dtype=torch.float64, device=fmodel.device)
            )
            block = torch.kron(P_out.T @ P_out, (P_in * diag_in[:, None]).T @ P_in)
            if rescaled:
                block = block * (layer.k_in / layer.a_dim) * (layer.k_out / layer.d_out)
            sl = slice(layer.offset, layer.offset + layer.dim)
            out[sl, sl] = block
        return out

    def fingerprint(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "type": "FactorizedProjector",
            "kind": self.kind,
            "random_state": self.random_state,
            "density": self.density,
            "dim": self.dim_,
            "layers": [
                [layer.name, layer.kind, layer.params, layer.a_dim, layer.d_out, layer.k_in, layer.k_out]
                for layer in self.layers_
            ],
            "generator": "torch.Generator(cpu) float32, seeds derive_seed(random_state, 'factorized', kind, layer, side)",
        }


__all__ = ["FactorizedProjector", "ProjectedLayer", "find_layers", "supports_factorized"]
