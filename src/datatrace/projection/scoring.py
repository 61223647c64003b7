"""Scores of queries against training features, block by block: the dense matrix or a streaming top-k.

Given transformed query features ``Q`` (``m x dim``, e.g. ``(1/n) (G + damping I)^{-1} P^T grad f_q``) and training
features ``F`` (``n x dim``, any :class:`~datatrace.projection.features.FeatureSource`: a tensor or a
:class:`~datatrace.projection.store.GradientStore`), the scores are ``S = Q F^T``, in the units and with the sign
of :data:`datatrace.scores.MEANING`. They are computed one feature chunk at a time, so at most one block of the
``m x n`` matrix exists besides what is returned: :func:`score_against_store` returns the dense ``(m, n)``
matrix, :func:`top_k_against_store` a streaming top-k (the ``k`` largest and the ``k`` most negative scores per
query) merged chunk by chunk with ``torch.topk`` in ``O(m k + m * chunk_rows)`` memory, as TRAK (Park et al.
2023) answers queries against its stored features. Features stored in 16 bits are upcast (to float32, or float64
for float64 queries) before every product, so accumulation is never done in 16 bits.

**Under torch.distributed** (a process group initialised by the caller; :mod:`datatrace.distributed`) the
functions are *collective*: every rank calls them with the same arguments. A sharded source (a store) is split
into contiguous ranges of chunks, one per rank (:func:`~datatrace.projection.features.my_chunks`); the columns
(dense scores) or the per-rank top-``k`` candidates (merged again with ``torch.topk``) are gathered, so every rank
gets the full result. If one rank fails, every rank raises. In-memory features are scored on every rank.

Example:
    >>> import torch
    >>> from datatrace.projection.scoring import score_against_store, top_k_against_store
    >>> features, queries = torch.randn(10, 4), torch.randn(2, 4)
    >>> torch.allclose(score_against_store(queries, features, block_rows=3), queries @ features.T)
    True
    >>> top_k_against_store(queries, features, k=3).proponents.indices.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from datatrace.distributed import all_gather_rows, collective_part, is_main_process
from datatrace.errors import StoreCorruptedError, bad_value, check_positive_int
from datatrace.projection.features import (
    DEFAULT_BLOCK_ELEMENTS,
    FeatureBlock,
    FeatureSource,
    as_feature_source,
    my_chunks,
)
from datatrace.scores import TopK

__all__ = ["StreamingTopK", "score_against_store", "top_k_against_store"]


class StreamingTopK(NamedTuple):
    """Per query, the ``k`` training examples with the largest scores (``proponents``, largest first) and the ``k``
    with the most negative scores (``opponents``, most negative first); each a :class:`~datatrace.TopK` of
    ``(n_query, k)`` tensors. When fewer than ``k`` scores of a query are positive (negative), the list is completed
    with the next ones in order, whatever their sign."""

    proponents: TopK
    opponents: TopK


def _prepare_queries(
    query_features: torch.Tensor, source: FeatureSource, transform: Callable | None
) -> tuple[torch.Tensor, int, int]:
    """The transformed queries in the compute dtype (float64 for float64 queries, else float32), ``n`` and ``dim``."""
    if not isinstance(query_features, torch.Tensor) or query_features.dim() != 2:
        raise bad_value(
            "query_features", query_features, "expected a 2-D tensor (n_query, dim)", "pass one row per query"
        )
    n, dim = len(source), source.dim
    q = transform(query_features) if transform is not None else query_features
    if not isinstance(q, torch.Tensor) or q.shape != (query_features.shape[0], dim):
        raise bad_value(
            "query_features" if transform is None else "transform",
            q if transform is not None else query_features,
            f"the store holds {dim} features per row, so queries need shape ({query_features.shape[0]}, {dim})"
            + (" after transform" if transform is not None else ""),
            "project the queries with the projection the store was built with",
        )
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.to(compute), n, dim


def _check_tiling(
    source: FeatureSource, start: int, rows: int, covered: int, n: int, end: bool = False
) -> None:
    """A StoreCorruptedError unless a block of ``rows`` rows at ``start`` continues the first ``covered`` of ``n``
    rows (or, at the ``end``, they are all covered): a source must yield every row once, in order."""
    if start != covered or covered + rows > n or (end and covered != n):
        raise StoreCorruptedError(
            f"the training features {source!r} hold n={n} rows but their chunks cover rows 0:{covered} and then "
            f"{'nothing more' if end else f'{start}:{start + rows}'}: a score for every training example cannot be "
            "computed. Fix: delete the store and compute it again."
        )


def score_against_store(
    query_features: torch.Tensor,
    store: FeatureSource | torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    block_rows: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Dense scores ``transform(Q) @ F^T``, shape ``(n_query, n)``, computed chunk by chunk.

    Args:
        query_features: ``(m, dim)`` projected query gradients.
        store: a :class:`~datatrace.projection.features.FeatureSource` (e.g. a complete
            :class:`~datatrace.projection.store.GradientStore`) or an in-memory ``(n, dim)`` tensor.
        transform: applied once to the queries before the products (e.g. the inverse projected curvature divided
            by ``n``); default none.
        block_rows: rows per block for an in-memory tensor (a store uses its chunks).
        progress: tqdm over blocks.

    Features stored in 16 bits are upcast to float32 (float64 when the transformed queries are float64) for the
    product, so accumulation is never done in 16 bits. The result is on the queries' device.

    Under ``torch.distributed`` with a store this is collective: each rank scores a contiguous range of chunks and
    the columns are gathered, so every rank returns the whole matrix. An in-memory tensor is scored on every rank.
    """
    source = as_feature_source(store, block_rows)
    mine = my_chunks(source)
    if mine is None:
        q, n, _ = _prepare_queries(query_features, source, transform)
        out = torch.empty(q.shape[0], n, dtype=q.dtype, device=q.device)
        covered = (
            0  # the blocks must tile the columns 0..n in order, or `out` would keep uninitialised memory
        )
        for block in tqdm(
            source.blocks(), total=source.n_chunks, desc="scoring", disable=not progress, leave=False
        ):
            values = block.values.to(device=q.device, dtype=q.dtype)
            _check_tiling(source, block.start, values.shape[0], covered, n)
            out[:, block.start : block.start + values.shape[0]] = q @ values.T
            covered += values.shape[0]
        _check_tiling(source, covered, 0, covered, n, end=True)
        return out

    def my_columns() -> torch.Tensor:
        q, _, _ = _prepare_queries(query_features, source, transform)
        parts = [
            q @ block.values.to(device=q.device, dtype=q.dtype).T
            for block in tqdm(
                source.blocks(mine),
                total=len(mine),
                desc="scoring",
                disable=not progress or not is_main_process(),
                leave=False,
            )
        ]
        # one row per training example of this rank's chunks: gathered in rank order = column order
        return torch.cat(parts, dim=1).T if parts else q.new_zeros(0, q.shape[0])

    gathered = all_gather_rows(collective_part(my_columns, "scores against the GradientStore"))
    if gathered is None:  # pragma: no cover - an invariant of the code above
        raise RuntimeError("internal error: gathered is missing")
    _check_tiling(source, gathered.shape[0], 0, gathered.shape[0], len(source), end=True)
    return gathered.T.contiguous()


def _local_top_k(
    q: torch.Tensor,
    blocks: Callable[[], Iterator[FeatureBlock]],
    k: int,
    query_block: int,
    progress: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((indices, values) of the largest, (indices, values) of the most negative)``, each ``(m, <= k)``, over
    the blocks that ``blocks()`` yields (called once per block of queries)."""
    parts_pos, parts_neg = [], []
    for qs in range(0, q.shape[0], query_block):
        qb = q[qs : qs + query_block]
        best_v = torch.empty(qb.shape[0], 0, dtype=q.dtype, device=q.device)
        best_i = torch.empty(qb.shape[0], 0, dtype=torch.long, device=q.device)
        worst_v, worst_i = best_v.clone(), best_i.clone()
        for feature_block in tqdm(blocks(), desc="top-k", disable=not progress, leave=False):
            start = feature_block.start
            block = feature_block.values.to(device=q.device, dtype=q.dtype)
            scores = qb @ block.T
            idx = torch.arange(start, start + block.shape[0], device=q.device).expand(qb.shape[0], -1)
            cand_v = torch.cat([best_v, scores], dim=1)
            cand_i = torch.cat([best_i, idx], dim=1)
            top = min(k, cand_v.shape[1])
            v, pos = torch.topk(cand_v, top, dim=1)
            best_v, best_i = v, torch.gather(cand_i, 1, pos)
            cand_v = torch.cat([worst_v, scores], dim=1)
            cand_i = torch.cat([worst_i, idx], dim=1)
            v, pos = torch.topk(-cand_v, top, dim=1)
            worst_v, worst_i = -v, torch.gather(cand_i, 1, pos)
        parts_pos.append((best_i, best_v))
        parts_neg.append((worst_i, worst_v))
    return (
        (torch.cat([p[0] for p in parts_pos]), torch.cat([p[1] for p in parts_pos])),
        (torch.cat([p[0] for p in parts_neg]), torch.cat([p[1] for p in parts_neg])),
    )


def _query_block(source: FeatureSource, k: int, query_block: int | None) -> int:
    """Queries per block: by default as many as keep ``queries x (k + chunk_rows)`` under DEFAULT_BLOCK_ELEMENTS."""
    if query_block is None:
        query_block = max(1, DEFAULT_BLOCK_ELEMENTS // max(1, source.chunk_rows + k))
    return check_positive_int("query_block", query_block)


def top_k_against_store(
    query_features: torch.Tensor,
    store: FeatureSource | torch.Tensor,
    k: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    block_rows: int | None = None,
    query_block: int | None = None,
    progress: bool = False,
) -> StreamingTopK:
    """Streaming top-k of ``transform(Q) @ F^T`` per query: the ``k`` largest scores and the ``k`` most negative.

    Never holds the ``(m, n)`` matrix: for each block of at most ``query_block`` queries it walks the features'
    chunks and merges each block of scores into the running ``k`` best with ``torch.topk``. Memory is
    ``O(query_block * (k + chunk_rows))``. ``store`` and ``block_rows`` are as in :func:`score_against_store`.

    Under ``torch.distributed`` with a store this is collective: each rank finds the top ``k`` of a contiguous
    range of chunks, the ``(m, k)`` candidates of all ranks are gathered and merged with ``torch.topk``, so every
    rank returns the same result. An in-memory tensor is scored on every rank.

    Returns:
        :class:`StreamingTopK` with ``proponents`` (largest first) and ``opponents`` (most negative first), each
        holding ``(m, min(k, n))`` ``indices`` (int64) and ``values``.
    """
    k = check_positive_int("k", k)
    source = as_feature_source(store, block_rows)
    mine = my_chunks(source)
    if mine is None:
        q, n, _ = _prepare_queries(query_features, source, transform)
        k = min(k, n)
        query_block = _query_block(source, k, query_block)
        (pi, pv), (ni, nv) = _local_top_k(q, source.blocks, k, query_block, progress)
        return StreamingTopK(TopK(pi, pv), TopK(ni, nv))

    def my_candidates() -> tuple[torch.Tensor, torch.Tensor, int]:
        q, n, _ = _prepare_queries(query_features, source, transform)
        kept = min(k, n)
        (pi, pv), (ni, nv) = _local_top_k(
            q,
            lambda: source.blocks(mine),
            kept,
            _query_block(source, kept, query_block),
            progress and is_main_process(),
        )
        # candidates as rows (k_rank, m, 2): proponents and opponents side by side, gathered over the ranks
        return torch.stack([pv.T, nv.T], dim=2), torch.stack([pi.T, ni.T], dim=2), kept

    values, indices, k = collective_part(my_candidates, "the top-k against the GradientStore")
    all_values, all_indices = all_gather_rows(values), all_gather_rows(indices)
    if not (
        all_values is not None and all_indices is not None
    ):  # pragma: no cover - an invariant of the code above
        raise RuntimeError("internal error: all_values or all_indices is missing")
    cand_v, cand_i = all_values.permute(2, 1, 0), all_indices.permute(2, 1, 0)  # (2, m, candidates)
    v, pos = torch.topk(cand_v[0], k, dim=1)
    proponents = TopK(torch.gather(cand_i[0], 1, pos), v)
    v, pos = torch.topk(-cand_v[1], k, dim=1)
    opponents = TopK(torch.gather(cand_i[1], 1, pos), -v)
    return StreamingTopK(proponents, opponents)
