"""One interface for training features, in memory or on disk: ``n`` rows of ``dim`` numbers, read in blocks.

Projected-gradient attributors score a query ``q`` against every training feature ``phi_i`` (one row of an
``(n, dim)`` matrix ``F``) with products ``Q F^T``, one block of rows at a time, so that a matrix larger than
memory is never loaded whole. A :class:`FeatureSource` says how many rows there are, how wide they are and how
they are cut into *chunks* (contiguous blocks of ``chunk_rows`` rows, the last one shorter), and yields them as
:class:`FeatureBlock` s. Two implementations:

* :class:`InMemoryFeatures`: a thin wrapper of an ``(n, dim)`` tensor, cut into views of ``chunk_rows`` rows;
  under torch.distributed every rank holds all of it (``sharded = False``: each rank scores all of it).
* :class:`~datatrace.projection.store.GradientStore`: chunk files on disk, memory-mapped; under torch.distributed
  each rank reads only its contiguous range of chunks (``sharded = True``, :func:`my_chunks`).

Scoring (:mod:`datatrace.projection.scoring`) and the attributors call only this interface; a tensor or a store
is wrapped once at their entry by :func:`as_feature_source`.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, NamedTuple

import torch

from datatrace.distributed import shard_bounds, world
from datatrace.errors import bad_value, check_positive_int

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "FeatureBlock",
    "FeatureSource",
    "InMemoryFeatures",
    "as_feature_source",
    "my_chunks",
    "read_ahead",
]

#: elements of a block of the score matrix computed at once (queries x feature rows <= this), and of a default
#: in-memory feature block (rows x dim <= this)
DEFAULT_BLOCK_ELEMENTS = 2**24


class FeatureBlock(NamedTuple):
    """One chunk of a feature source: rows ``start:start + len(values)`` of the ``(n, dim)`` feature matrix."""

    chunk: int
    start: int
    values: torch.Tensor


class FeatureSource(abc.ABC):
    """``n`` training features of ``dim`` numbers each (``len(source) == n``), read chunk by chunk.

    Chunk ``c`` holds rows ``c * chunk_rows`` to ``min(n, (c + 1) * chunk_rows)``; :meth:`blocks` yields them.
    ``sharded`` says whether, under torch.distributed, each rank reads only its own range of chunks
    (:meth:`chunks_for_rank`) or every rank reads all of them.
    """

    #: under torch.distributed, each rank reads only its own chunks (True) or all of them (False)
    sharded: bool = False

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of rows ``n`` (training examples)."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Features per row."""

    @property
    @abc.abstractmethod
    def chunk_rows(self) -> int:
        """Rows per chunk (the last chunk may be shorter)."""

    @property
    @abc.abstractmethod
    def n_chunks(self) -> int:
        """The number of chunks."""

    @abc.abstractmethod
    def blocks(self, chunks: Sequence[int] | None = None) -> Iterator[FeatureBlock]:
        """The :class:`FeatureBlock` s of ``chunks`` (default: all of them, in order)."""

    def chunks_for_rank(self, rank: int, size: int) -> range:
        """The contiguous range of chunks that rank ``rank`` of ``size`` reads when the source is sharded."""
        lo, hi = shard_bounds(self.n_chunks, size)[rank]
        return range(lo, hi)


class InMemoryFeatures(FeatureSource):
    """An ``(n, dim)`` tensor of features as a :class:`FeatureSource`: chunks are views of ``chunk_rows`` rows.

    Args:
        features: the ``(n, dim)`` tensor (kept, not copied).
        block_rows: rows per chunk; default: as many as keep a chunk under ``DEFAULT_BLOCK_ELEMENTS`` numbers
            (at most ``n``).
    """

    sharded = False

    def __init__(self, features: torch.Tensor, block_rows: int | None = None) -> None:
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise bad_value(
                "features", features, "in-memory features must be a 2-D tensor (n, dim)", "reshape them"
            )
        self.features = features
        if block_rows is None:
            default = max(1, DEFAULT_BLOCK_ELEMENTS // max(1, int(features.shape[1])))
            self._chunk_rows = max(1, min(int(features.shape[0]), default))
        else:
            self._chunk_rows = check_positive_int("block_rows", block_rows)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def chunk_rows(self) -> int:
        return self._chunk_rows

    @property
    def n_chunks(self) -> int:
        return -(-len(self) // self._chunk_rows)

    def blocks(self, chunks: Sequence[int] | None = None) -> Iterator[FeatureBlock]:
        rows = self._chunk_rows
        for chunk in range(self.n_chunks) if chunks is None else chunks:
            start = int(chunk) * rows
            yield FeatureBlock(int(chunk), start, self.features[start : start + rows])

    def __repr__(self) -> str:
        return f"InMemoryFeatures(n={len(self)}, dim={self.dim}, dtype={self.features.dtype}, chunk_rows={self._chunk_rows})"


def as_feature_source(features: FeatureSource | torch.Tensor, block_rows: int | None = None) -> FeatureSource:
    """``features`` as a :class:`FeatureSource`: a source as is, a tensor wrapped in :class:`InMemoryFeatures`
    with ``block_rows`` rows per chunk (``block_rows`` is ignored for a source, which has its own chunks)."""
    if isinstance(features, FeatureSource):
        return features
    if isinstance(features, torch.Tensor) and features.dim() == 2:
        return InMemoryFeatures(features, block_rows)
    raise bad_value(
        "store",
        features,
        "expected a GradientStore (a FeatureSource) or a 2-D (n, dim) tensor of features",
        "pass a GradientStore, or reshape in-memory features to one row per training example",
    )


def my_chunks(source: FeatureSource) -> range | None:
    """This rank's contiguous range of chunks when a sharded source is read under torch.distributed, else None
    (every chunk is read here)."""
    rank, size, distributed = world()
    if not distributed or not source.sharded:
        return None
    return source.chunks_for_rank(rank, size)


def read_ahead(order: Sequence[int], load: Callable[[int], Any], depth: int) -> Iterator[tuple[int, Any]]:
    """``(i, load(i))`` for every ``i`` of ``order``, in order, while worker threads already run ``load`` on the
    next ``depth`` items: a chunk of a store is read (and checksummed) while the one before is used, since numpy
    and hashlib release the GIL. An error of ``load(i)`` is raised at ``i``'s place; a reader that stops early
    waits only for the loads already started."""
    if len(order) < 2 or depth < 2:
        for i in order:
            yield i, load(i)
        return
    todo = iter(order)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="datatrace-read-ahead") as pool:
        window = deque((i, pool.submit(load, i)) for i in islice(todo, depth))
        while window:
            i, future = window.popleft()
            value = future.result()
            following = next(todo, None)
            if following is not None:
                window.append((following, pool.submit(load, following)))
            yield i, value
