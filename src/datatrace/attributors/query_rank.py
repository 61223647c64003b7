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

from dataclasses import dataclass

import torch

from datatrace.capture.engine import Layer, find_layers
from datatrace.errors import check_positive_int
from datatrace.gradients.functional import FunctionalModel
from datatrace.params import ParamSpace

__all__ = ["LowRankQueries", "compress_queries"]

#: a reconstruction for scoring holds at most this many numbers of dense query rows at once
DENSE_CHUNK_ELEMENTS = 2**25


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

    def dot(self, rows: torch.Tensor) -> torch.Tensor:
        """``(q, b)`` products of every (compressed) query with every flat gradient row of ``rows`` ``(b, p)``,
        rebuilding at most :data:`DENSE_CHUNK_ELEMENTS` numbers of query rows at a time."""
        q, p = self.num_queries, self.space.numel
        step = max(1, DENSE_CHUNK_ELEMENTS // max(1, p))
        out = torch.empty(q, rows.shape[0], dtype=rows.dtype, device=rows.device)
        for start in range(0, q, step):
            out[start : start + step] = self.dense(start, start + step) @ rows.T
        return out


def compress_queries(solved: torch.Tensor, fmodel: FunctionalModel, rank: int) -> LowRankQueries:
    """Compress ``solved`` ``(q, p)`` (flat rows in ``fmodel.space``) to rank ``rank`` per supported layer."""
    check_positive_int("query_rank", rank)
    space = fmodel.space
    blocks = space.unflatten(solved)
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
