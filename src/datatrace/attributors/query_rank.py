"""Low-rank compression of solved query gradients, layer by layer (query batching at language-model scale).

A query's solved gradient ``v_q = H^{-1} grad f_q`` restricted to a supported layer is an ``(out, in')`` matrix
``V_q`` (the layout of :class:`datatrace.capture.engine.Layer`: the weight, with the bias as a last column). It is
replaced by its best rank-``r`` approximation in the Frobenius norm (Eckart-Young), the truncated SVD

    V_q  ~  U_r diag(s_r) W_r^T,      kept energy  = sum_{k <= r} s_k^2 / sum_k s_k^2,

which stores ``r (out + in' + 1)`` numbers per query and layer instead of ``out * in'``. A score is linear in
``v_q``, so its error is ``<V_q - V_q^(r), G_i>`` with the training gradient block ``G_i``: bounded by the dropped
singular values' norm times ``||G_i||``. Parameters outside supported layers (embeddings, LayerNorm), and layers
with ``min(out, in') <= r``, stay uncompressed. Grosse et al. (2023, "Studying large language model
generalization with influence functions", Sec. 3.2) compress query gradients this way to batch many queries
against each training gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from datatrace.capture.engine import Layer, find_layers, recording
from datatrace.errors import check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.params import ParamSpace

__all__ = ["LowRankQueries", "compress_queries", "layer_products"]

#: a reconstruction for scoring holds at most this many numbers of dense query rows at once
DENSE_CHUNK_ELEMENTS = 2**25
#: the factored products hold at most this many numbers of (query, example, position, rank) terms at once
FACTOR_CHUNK_ELEMENTS = 2**24


@dataclass
class LowRankQueries:
    """Solved query gradients with each supported layer's block kept as truncated SVD factors.

    ``factors``: per compressed layer, ``(layer, U (q, out, r), s (q, r), W (q, in', r))``; ``rest``: the other
    parameter blocks, dense, ``(q, *shape)``; ``energy``: per compressed layer, the share of each query block's
    squared Frobenius norm that the kept singular values hold, ``(q,)``.
    """

    rank: int
    space: ParamSpace
    factors: list[tuple[Layer, torch.Tensor, torch.Tensor, torch.Tensor]]
    rest: dict[str, torch.Tensor]
    energy: list[torch.Tensor]
    #: per layer name, its ``(q, out, in')`` query block as a dense matrix, built once when first needed
    _matrices: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_queries(self) -> int:
        if self.factors:
            return int(self.factors[0][1].shape[0])
        return int(next(iter(self.rest.values())).shape[0])

    @property
    def stored_values(self) -> int:
        """Numbers held per query: the factors plus the uncompressed blocks."""
        kept = sum(
            u.shape[1] * u.shape[2] + s.shape[1] + w.shape[1] * w.shape[2] for _, u, s, w in self.factors
        )
        return int(kept + sum(t[0].numel() for t in self.rest.values()))

    @property
    def min_energy(self) -> float:
        """The smallest kept share of a query block's squared norm over queries and compressed layers (1.0 when
        nothing was compressed)."""
        if not self.energy:
            return 1.0
        return float(torch.stack([e.min() for e in self.energy]).min())

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Queries ``start:stop`` rebuilt as flat rows ``(q, p)`` (the rank-``r`` approximation of ``v_q``)."""
        blocks: dict[str, torch.Tensor] = {n: t[start:stop] for n, t in self.rest.items()}
        shapes = dict(zip(self.space.names, self.space.shapes))
        for layer, u, s, w in self.factors:
            matrix = (u[start:stop] * s[start:stop, None, :]) @ w[start:stop].transpose(1, 2)
            blocks.update(layer.scatter(matrix, shapes))
        return self.space.flatten(blocks, batch_dims=1)

    def layer_matrix(self, layer: Layer) -> torch.Tensor:
        """``layer``'s ``(q, out, in')`` query block, dense (rebuilt from its factors when compressed), cached."""
        if layer.name not in self._matrices:
            factors = {f[0].name: f[1:] for f in self.factors}
            if layer.name in factors:
                u, s, w = factors[layer.name]
                self._matrices[layer.name] = (u * s[:, None, :]) @ w.transpose(1, 2)
            else:
                self._matrices[layer.name] = layer.gather({n: self.rest[n] for n in layer.params}, lead=1)
        return self._matrices[layer.name]

    def dot(self, rows: torch.Tensor) -> torch.Tensor:
        """``(q, b)`` products of every (compressed) query with every flat gradient row of ``rows`` ``(b, p)``,
        rebuilding at most :data:`DENSE_CHUNK_ELEMENTS` numbers of query rows at a time."""
        q, p = self.num_queries, self.space.numel
        step = max(1, DENSE_CHUNK_ELEMENTS // max(1, p))
        out = torch.empty(q, rows.shape[0], dtype=rows.dtype, device=rows.device)
        for start in range(0, q, step):
            out[start : start + step] = self.dense(start, start + step) @ rows.T
        return out


def compress_queries(solved: torch.Tensor, fmodel: FunctionalModel, rank: int | None) -> LowRankQueries:
    """Compress ``solved`` ``(q, p)`` (flat rows in ``fmodel.space``) to rank ``rank`` per supported layer
    (``None``: nothing compressed, every block kept dense)."""
    space = fmodel.space
    blocks = space.unflatten(solved)
    if rank is None:
        return LowRankQueries(0, space, [], {n: b.contiguous() for n, b in blocks.items()}, [])
    check_positive_int("query_rank", rank)
    layers, _ = find_layers(fmodel, "query_rank", "leave query_rank=None")
    factors, energy = [], []
    compressed: set[str] = set()
    for layer in layers:
        matrix = layer.gather({n: blocks[n] for n in layer.params}, lead=1)  # (q, out, in')
        if min(matrix.shape[1:]) <= rank:
            continue  # nothing to gain: the block's own rank is at most r
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        total = s.pow(2).sum(dim=1).clamp_min(torch.finfo(s.dtype).tiny)
        energy.append(s[:, :rank].pow(2).sum(dim=1) / total)
        factors.append(
            (layer, u[..., :rank].contiguous(), s[:, :rank].contiguous(), vh[:, :rank].mT.contiguous())
        )
        compressed.update(layer.params)
    rest = {n: blocks[n].contiguous() for n in space.names if n not in compressed}
    return LowRankQueries(rank, space, factors, rest, energy)


def layer_products(
    queries: LowRankQueries, fmodel: FunctionalModel, layers: list[Layer], batch: tuple | dict
) -> torch.Tensor:
    """``(b, q)`` products ``<V_q, G_i>`` of every query with every example's loss gradient, never forming the
    per-example gradients: every parameter in scope must belong to ``layers`` (one forward with hooks and one
    backward of the summed losses, examples independent as in eval mode).

    With a layer's input rows ``a_t`` and output gradients ``s_t`` of example ``i`` (``G_i = sum_t s_t a_t^T``), a
    dense query block gives ``sum_{o,j} V_oj (G_i)_oj``; a rank-``r`` one ``sum_t sum_k s_k (s_t^T u_k)(w_k^T a_t)``
    (Grosse et al. 2023), used when it is the cheaper, ``q T r (out + in') < q out in' + T out in'``.
    """
    with torch.enable_grad(), recording(layers, "query_rank") as rec:
        losses = fmodel.task.loss(fmodel.model, batch)
    b = losses.shape[0]
    if losses.shape != (b,):
        raise ValueError(
            f"the task's loss returned shape {tuple(losses.shape)}; it must return one value per example, shape "
            "(batch_size,). Fix: use reduction='none' and do not average over the batch."
        )
    q = queries.num_queries
    out = torch.zeros(q, b, dtype=fmodel.dtype, device=fmodel.device)
    live = rec.outputs()
    if not live or not losses.requires_grad:
        return out.T
    grads = torch.autograd.grad(losses.sum(), live, allow_unused=True)
    factored = {layer.name: (u, sv, w) for layer, u, sv, w in queries.factors}
    for i, (layer, s_rows) in enumerate(zip(layers, rec.output_rows(layers, grads, 1))):
        a = rec.inputs(i)
        if a is None or s_rows is None:
            continue
        s_rows = s_rows[0]  # (b, T, out)
        if a.shape[0] != b:
            raise ValueError(
                f"layer {layer.name!r} saw {a.shape[0]} rows for a batch of {b} examples: the layer products need "
                "the batch axis first in every supported layer's input. Fix: keep_gradients=True."
            )
        positions = a.shape[1]
        if layer.name in factored:
            u, sv, w = factored[layer.name]
            rank = sv.shape[1]
            if (
                q * positions * rank * (layer.out_dim + a.shape[2])
                < (q + positions) * layer.out_dim * a.shape[2]
            ):
                step = max(1, FACTOR_CHUNK_ELEMENTS // max(1, b * positions * rank))
                for c in range(0, q, step):
                    left = torch.einsum("bto,qor->qbtr", s_rows, u[c : c + step])
                    right = torch.einsum("bti,qir->qbtr", a, w[c : c + step])
                    out[c : c + step] += torch.einsum("qbtr,qr->qb", left * right, sv[c : c + step])
                continue
        matrix = queries.layer_matrix(layer)
        gradient = torch.einsum("bto,bti->boi", s_rows, a)  # (b, out, in')
        out += matrix.reshape(q, -1) @ gradient.reshape(b, -1).T
    return out.T
