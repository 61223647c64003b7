"""Sharding datatrace's work over a ``torch.distributed`` process group (e.g. processes started by ``torchrun``).

datatrace never starts a process group and never wraps a model in ``DistributedDataParallel``. If the *caller*
has initialised ``torch.distributed`` (``torchrun`` plus ``torch.distributed.init_process_group``), the helpers
here split the training examples into contiguous shards, one per rank, and combine the per-rank results so that
**every rank ends with the same answer as a single process** (up to the order of floating-point additions):

* per-example rows (gradients, projected gradients): each rank computes the rows of its shard and
  :func:`all_gather_rows` puts all ``n`` rows back together, in index order, on every rank
  (:func:`distributed_per_example`);
* sums over the data (the objective gradient, Hessian-vector products, the Gauss-Newton matrix): each rank sums
  over its shard and :func:`all_reduce_sum` adds the partial sums (:func:`distributed_sum`);
* work that is not a loop over examples (writing store chunks, scoring store chunks): each rank does its part in a
  ``try``, then :func:`raise_if_any_failed` (also a barrier) tells every rank whether any part failed, and only
  then are the results combined.

Without an initialised process group (or inside :func:`local_only`) every helper is the single-process identity,
so library code can call them unconditionally. All ranks must make the same calls in the same order (SPMD), as
with any collective: code that runs a datatrace computation on rank 0 only must wrap it in :func:`local_only`,
otherwise rank 0 waits for the others forever.

If the per-rank computation raises on one rank, :func:`distributed_per_example` and :func:`distributed_sum` tell
every rank (through the metadata they exchange anyway), so that all ranks raise instead of the healthy ones
hanging in a collective: the failing rank re-raises its own exception, the others a ``RuntimeError`` naming it.

Both ``gloo`` (CPU) and ``nccl`` (CUDA) work: tensors are moved to the device the backend needs for the
collective and the result comes back on the caller's device and in the caller's dtype.

Example (run with ``torchrun --nproc-per-node 2 script.py``)::

    import torch.distributed as dist
    from datatrace.distributed import distributed_per_example, world

    dist.init_process_group("gloo")
    rank, world_size, _ = world()
    grads = distributed_per_example(fmodel.per_example_grads, train_source)  # (n, p) on every rank
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from datatrace.data import DataLike, as_data_source
from datatrace.errors import bad_value, check_positive_int

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "collective_part",
    "distributed_per_example",
    "distributed_sum",
    "is_main_process",
    "local_only",
    "raise_if_any_failed",
    "shard_bounds",
    "shard_indices",
    "world",
]

logger = logging.getLogger(__name__)

_LOCAL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("datatrace_local_only", default=False)

#: dtypes that can travel through the collectives, by code (the code is exchanged as metadata)
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
#: most dimensions a gathered tensor may have (the metadata vector has a fixed length)
_MAX_DIMS = 12
_NONE, _PRESENT, _FAILED = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# Who am I
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def local_only() -> Iterator[None]:
    """Inside this block datatrace ignores any process group and computes everything in this process.

    Use it when only some ranks run a datatrace computation (e.g. ``if rank == 0: ...``): the collectives would
    otherwise wait for the ranks that never join.
    """
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def world(group: Any = None) -> tuple[int, int, bool]:
    """``(rank, world_size, is_distributed)`` of this process in ``group`` (default: the whole world).

    ``is_distributed`` is True only when ``torch.distributed`` is available and initialised, the group has more
    than one process and no :func:`local_only` block is active. Nothing is ever initialised here.
    """
    if _LOCAL_ONLY.get() or not dist.is_available() or not dist.is_initialized():
        return 0, 1, False
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            f"this process is not a member of the process group {group!r} (rank {rank}). Fix: pass a group this "
            "process belongs to, or group=None for the whole world."
        )
    return rank, size, size > 1


def is_main_process(group: Any = None) -> bool:
    """True on rank 0 (and in a single process): the rank that logs and shows progress bars."""
    return world(group)[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------------
def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``, one contiguous range per rank covering ``0..n-1`` in order.

    The first ``n % world_size`` ranks get one example more than the others (as ``numpy.array_split``); ranks
    past ``n`` get an empty range. Deterministic: it depends on ``n`` and ``world_size`` only.
    """
    n = check_positive_int("n", n, minimum=0)
    world_size = check_positive_int("world_size", world_size)
    base, extra = divmod(n, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        stop = start + base + (1 if rank < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_indices(
    n: int, rank: int | None = None, world_size: int | None = None, group: Any = None
) -> torch.Tensor:
    """The example indices this rank works on: a contiguous, ordered slice of ``0..n-1`` (int64).

    ``rank`` and ``world_size`` default to :func:`world`; pass both to plan shards for another rank. Concatenating
    the shards of ranks ``0..world_size-1`` gives ``arange(n)``, so gathered rows come back in index order.
    """
    if (rank is None) != (world_size is None):
        raise bad_value(
            "rank" if rank is not None else "world_size",
            rank if rank is not None else world_size,
            "rank and world_size must be given together (or neither, to use torch.distributed's)",
            "pass both, e.g. shard_indices(n, rank=0, world_size=2), or neither",
        )
    if rank is None:
        rank, world_size, _ = world(group)
    world_size = check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise bad_value(
            "rank", rank, f"expected an int with 0 <= rank < world_size={world_size}", "pass a rank"
        )
    start, stop = shard_bounds(n, world_size)[rank]
    return torch.arange(start, stop, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------------------------
def _comm_device(device: torch.device, group: Any) -> torch.device:
    """The device a collective of ``group``'s backend needs for a tensor that lives on ``device``."""
    backend = str(dist.get_backend(group)).lower()
    if "cpu:" in backend and "cuda:" in backend:  # e.g. "cpu:gloo,cuda:nccl": dispatch by device
        return device
    if backend == "nccl":
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device  # mpi, ucc, custom backends: trust the caller's device


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over all ranks, on every rank (same dtype and device as ``tensor``).

    Single process: returns ``tensor`` itself. Otherwise the input is left unchanged and a new tensor returned.
    """
    if not isinstance(tensor, torch.Tensor):
        raise bad_value("tensor", tensor, "expected a torch.Tensor", "pass a tensor (e.g. a partial sum)")
    _, _, distributed = world(group)
    if not distributed:
        return tensor
    comm = _comm_device(tensor.device, group)
    work = tensor.detach().to(comm, copy=True).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(tensor.device)


def _meta(tensor: torch.Tensor | None, failed: bool, name: str) -> torch.Tensor:
    """Fixed-length int64 description of a rank's contribution: status, dtype code, ndim, shape."""
    meta = torch.full((3 + _MAX_DIMS,), -1, dtype=torch.long)
    if failed:
        meta[0] = _FAILED
        return meta
    if tensor is None:
        meta[0] = _NONE
        return meta
    if tensor.dim() == 0 or tensor.dim() > _MAX_DIMS:
        raise bad_value(
            name,
            tensor,
            f"expected a tensor with 1 to {_MAX_DIMS} dimensions (rows first)",
            "reshape it to (rows, ...)",
        )
    if tensor.dtype not in _DTYPES:
        raise bad_value(name, tensor, f"expected one of the dtypes {list(_DTYPES)}", "cast it first")
    meta[0] = _PRESENT
    meta[1] = _DTYPES.index(tensor.dtype)
    meta[2] = tensor.dim()
    meta[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.long)
    return meta


def _exchange_meta(
    tensor: torch.Tensor | None, error: BaseException | None, group: Any, what: str, name: str
) -> tuple[list[int], torch.dtype | None, tuple[int, ...] | None, torch.device]:
    """Agree across ranks on dtype and trailing shape, and on whether any rank failed (then everyone raises).

    Returns the row count of every rank, the common dtype and the trailing shape (None when no rank has a
    tensor), and the device the collective runs on.
    """
    # A bad local argument must not leave the other ranks waiting: report it as a failure, then raise it.
    try:
        meta = _meta(tensor, error is not None, name)
    except ValueError as err:
        error, meta = err, _meta(None, True, name)
    device = tensor.device if tensor is not None else torch.device("cpu")
    comm = _comm_device(device, group)
    _, size, _ = world(group)
    metas = [torch.empty_like(meta, device=comm) for _ in range(size)]
    dist.all_gather(metas, meta.to(comm), group=group)
    rows_meta = [m.cpu() for m in metas]
    failed = [r for r, m in enumerate(rows_meta) if int(m[0]) == _FAILED]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(
            f"rank(s) {failed} failed while computing {what}, so this rank stops too (nothing was gathered). "
            f"Fix: see the exception raised on rank {failed[0]}."
        )
    present = [m for m in rows_meta if int(m[0]) == _PRESENT]
    if not present:
        return [0] * size, None, None, comm
    first = present[0]
    dtype = _DTYPES[int(first[1])]
    ndim = int(first[2])
    trailing = tuple(int(d) for d in first[4 : 3 + ndim])
    for rank, m in enumerate(rows_meta):
        if int(m[0]) != _PRESENT:
            continue
        other_dtype = _DTYPES[int(m[1])]
        other_trailing = tuple(int(d) for d in m[4 : 3 + int(m[2])])
        if other_dtype != dtype or int(m[2]) != ndim or other_trailing != trailing:
            raise ValueError(
                f"{what}: ranks disagree on {name}: rank {rank} has dtype {other_dtype} and shape (rows, "
                f"*{other_trailing}) but another rank has dtype {dtype} and shape (rows, *{trailing}). Fix: every "
                "rank must produce rows of the same dtype and trailing shape (same model, task and parameters)."
            )
    rows = [int(m[3]) if int(m[0]) == _PRESENT else 0 for m in rows_meta]
    return rows, dtype, trailing, comm


def _gather_rows(
    tensor: torch.Tensor | None, error: BaseException | None, group: Any, what: str
) -> torch.Tensor | None:
    rows, dtype, trailing, comm = _exchange_meta(tensor, error, group, what, "tensor")
    if dtype is None or trailing is None:
        return None
    top = max(rows)
    padded = torch.zeros((top, *trailing), dtype=dtype, device=comm)
    if tensor is not None and tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor.detach().to(comm)
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded, group=group)
    out = torch.cat([part[:count] for part, count in zip(parts, rows)])
    return out.to(tensor.device) if tensor is not None else out


def all_gather_rows(tensor: torch.Tensor | None, group: Any = None) -> torch.Tensor | None:
    """Concatenate every rank's rows in rank order, on every rank: ``cat([t_0, t_1, ...], dim=0)``.

    Ranks may hold different numbers of rows (including zero, or ``None`` for "no rows and no idea of their
    shape"); the trailing shape and dtype must agree. Works on gloo and nccl by padding every contribution to the
    largest row count, gathering, and trimming. The result has ``tensor``'s dtype and device (on a rank that
    passed ``None``: the device the backend communicates on). Returns ``None`` only if every rank passed ``None``.

    Single process: returns ``tensor`` itself.
    """
    if tensor is not None and not isinstance(tensor, torch.Tensor):
        raise bad_value("tensor", tensor, "expected a torch.Tensor or None", "pass the rows of this rank")
    _, _, distributed = world(group)
    if not distributed:
        return tensor
    return _gather_rows(tensor, None, group, "all_gather_rows")


# ---------------------------------------------------------------------------------------------------------------
# Sharded loops over a data set
# ---------------------------------------------------------------------------------------------------------------
def _call(fn: Callable[..., Any], idx: torch.Tensor, batch: tuple, with_indices: bool) -> Any:
    return fn(idx, batch) if with_indices else fn(batch)


def distributed_per_example(
    fn: Callable[..., torch.Tensor],
    source: DataLike,
    *,
    batch_size: int | None = None,
    with_indices: bool = False,
    progress: bool = False,
    desc: str = "per-example rows",
    group: Any = None,
) -> torch.Tensor:
    """Rows ``fn(batch)`` for every example of ``source``, computed on this rank's shard and gathered in order.

    Args:
        fn: ``fn(batch) -> Tensor (len(batch), ...)`` (or ``fn(indices, batch)`` with ``with_indices=True``),
            e.g. ``FunctionalModel.per_example_grads``. One row per example of the batch.
        source: the data (a :class:`~datatrace.data.DataSource` or anything ``as_data_source`` accepts).
        batch_size: examples per call of ``fn`` (default: the source's own).
        with_indices: pass the batch's example indices (int64 tensor) as ``fn``'s first argument.
        progress: show a tqdm bar (on rank 0 only, counting rank 0's shard).
        desc: the bar's label, also used in error messages.
        group: the process group (default: the whole world).

    Returns:
        a tensor with ``len(source)`` rows in index order, the same on every rank. Single process: the plain loop.
    """
    source = as_data_source(source, "source", batch_size)
    n = len(source)
    rank, _, distributed = world(group)
    indices = shard_indices(n, group=group)
    local: torch.Tensor | None = None
    error: BaseException | None = None
    try:
        rows = []
        with tqdm(total=len(indices), desc=desc, disable=not progress or rank != 0, leave=False) as bar:
            for idx, batch in source.batches(batch_size, indices=indices):
                out = _call(fn, idx, batch, with_indices)
                if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != len(idx):
                    raise ValueError(
                        f"{desc}: fn returned {_shape_of(out)} for a batch of {len(idx)} examples; it must return "
                        f"a tensor with one row per example, shape ({len(idx)}, ...). Fix: return per-example rows."
                    )
                rows.append(out)
                bar.update(len(idx))
        local = torch.cat(rows) if rows else None
    except Exception as err:
        if not distributed:
            raise
        logger.error("rank %d failed while computing %s: %s", rank, desc, err)
        error = err
    if not distributed:
        if local is None:  # pragma: no cover - a DataSource is never empty
            raise RuntimeError("internal error: no rows were computed for a non-empty data source")
        return local
    out = _gather_rows(local, error, group, desc)
    if out is None:  # pragma: no cover - only if every shard is empty, which a non-empty source rules out
        raise RuntimeError(f"{desc}: no rank produced any rows.")
    return out


def distributed_sum(
    fn: Callable[..., torch.Tensor],
    source: DataLike,
    *,
    batch_size: int | None = None,
    with_indices: bool = False,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "sum over the data",
    group: Any = None,
) -> torch.Tensor:
    """``sum over batches of fn(batch)`` over all of ``source``: each rank sums its shard, then the sums are added.

    ``fn`` returns one tensor per batch (any shape, the same for every batch), already scaled as the caller wants
    (e.g. ``grad of losses.sum() / n``); the result is the same on every rank. Use it for the objective gradient,
    Hessian-vector products, the Gauss-Newton matrix or any other additive statistic of the data.

    Args:
        fn: ``fn(batch) -> Tensor`` (or ``fn(indices, batch)`` with ``with_indices=True``).
        source: the data (a :class:`~datatrace.data.DataSource` or anything ``as_data_source`` accepts).
        batch_size: examples per call of ``fn`` (default: the source's own).
        with_indices: pass the batch's example indices as ``fn``'s first argument.
        device: where a rank whose shard is empty (``len(source) < world_size``) puts the result; default: the
            device the backend communicates on. Other ranks return it where ``fn``'s outputs live.
        progress, desc, group: as in :func:`distributed_per_example`.
    """
    source = as_data_source(source, "source", batch_size)
    rank, _, distributed = world(group)
    indices = shard_indices(len(source), group=group)
    total: torch.Tensor | None = None
    error: BaseException | None = None
    try:
        with tqdm(total=len(indices), desc=desc, disable=not progress or rank != 0, leave=False) as bar:
            for idx, batch in source.batches(batch_size, indices=indices):
                out = _call(fn, idx, batch, with_indices)
                if not isinstance(out, torch.Tensor):
                    raise ValueError(f"{desc}: fn returned {_shape_of(out)}; it must return a tensor.")
                if total is not None and out.shape != total.shape:
                    raise ValueError(
                        f"{desc}: fn returned shape {tuple(out.shape)} after {tuple(total.shape)} for an earlier "
                        "batch; every batch must give the same shape. Fix: return a fixed-shape partial sum."
                    )
                total = out if total is None else total + out  # never in place: out may be the caller's
                bar.update(len(idx))
    except Exception as err:
        if not distributed:
            raise
        logger.error("rank %d failed while computing %s: %s", rank, desc, err)
        error = err
    if not distributed:
        if total is None:  # pragma: no cover - a DataSource is never empty
            raise RuntimeError("internal error: no rows were computed for a non-empty data source")
        return total
    # agree on shape/dtype (for ranks with an empty shard) and on failures before the reduction itself
    local_meta = None if total is None else total.reshape(1, *total.shape)
    _, dtype, trailing, comm = _exchange_meta(local_meta, error, group, desc, "the partial sum")
    if (
        dtype is None or trailing is None
    ):  # pragma: no cover - a non-empty source always has a non-empty shard
        raise RuntimeError(f"{desc}: no rank produced a partial sum.")
    if total is None:
        total = torch.zeros(trailing, dtype=dtype, device=device if device is not None else comm)
    return all_reduce_sum(total, group)


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------------------------
# Synchronisation for work that is not a loop over examples
# ---------------------------------------------------------------------------------------------------------------
def raise_if_any_failed(
    error: BaseException | None, what: str = "a distributed computation", group: Any = None
) -> None:
    """Collective: every rank says whether its part of ``what`` failed; if any did, every rank raises.

    Call it on every rank after the rank's own part of a computation, passing the exception that part raised (or
    ``None``), and before any collective that combines the parts. It uses the same metadata exchange (and the same
    messages) as :func:`distributed_per_example`: the failing rank re-raises ``error``, the others raise a
    ``RuntimeError`` naming the failed rank(s), so no rank is left waiting in a later collective. When no rank
    failed it returns on every rank after all of them arrived, so it is also a barrier.

    Single process: raises ``error`` if one is given, otherwise does nothing.

    Example::

        error = None
        try:
            part = compute_my_part()
        except Exception as err:
            error = err
        raise_if_any_failed(error, "my computation")  # every rank raises, or every rank continues
        total = all_reduce_sum(part)
    """
    if error is not None and not isinstance(error, BaseException):
        raise bad_value(
            "error", error, "expected an exception or None", "pass the exception this rank caught"
        )
    _, _, distributed = world(group)
    if not distributed:
        if error is not None:
            raise error
        return
    _exchange_meta(None, error, group, what, "status")


def collective_part(part: Callable[[], Any], what: str, group: Any = None) -> Any:
    """Collective: run this rank's ``part()`` and return its result; if the part raised on any rank, every rank
    raises (:func:`raise_if_any_failed`), so no rank waits in a later collective. Single process: ``part()``."""
    if not world(group)[2]:
        return part()
    result, error = None, None
    try:
        result = part()
    except Exception as err:
        error = err
    raise_if_any_failed(error, what, group)
    return result


def barrier(group: Any = None) -> None:
    """Wait until every rank of ``group`` has called it (a no-op in a single process).

    A one-element :func:`all_reduce_sum`, which works on every backend without device arguments. It carries no
    failure flag: where a rank may have failed before getting here, use :func:`raise_if_any_failed` instead.
    """
    _, _, distributed = world(group)
    if distributed:
        all_reduce_sum(torch.zeros(1), group)
