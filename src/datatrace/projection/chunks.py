"""A store chunk outside the store's bookkeeping: its file format, and its report to rank 0 under torch.distributed.

**File.** A chunk of a :class:`~datatrace.projection.store.GradientStore` is one ``.npy`` file (never pickled) of
``(rows, dim)`` features in the storage dtype: float32, float64, float16, or bfloat16 kept as raw 16-bit words
(numpy has no bfloat16). It is read back as a copy-on-write memory map, so a store larger than memory is read
chunk by chunk.

**Report.** :meth:`GradientStore.fill <datatrace.projection.store.GradientStore.fill>` deals the missing chunks out
over the ranks and rank 0 alone writes the manifest, so after each round every rank sends one float64 row,
``[chunk, layout checksum, 32 sha256 bytes, accumulator values...]``, through one all-gather
(:func:`~datatrace.distributed.all_gather_rows`). Every entry is an integer below ``2**32`` or a float64 value, so
the row is exact. The layout checksum (crc32 of the accumulators' names and shapes) lets rank 0 check that it
decodes the values with the layout they were written with.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zlib
from collections.abc import Mapping

import numpy as np
import torch

from datatrace.errors import StoreCorruptedError, bad_value
from datatrace.fileio import atomic_write

__all__ = [
    "STORAGE_DTYPES",
    "Layout",
    "accumulator_layout",
    "add_accumulators",
    "check_chunk_features",
    "chunk_file_name",
    "decode_reports",
    "dtype_name",
    "encode_report",
    "read_chunk_file",
    "write_chunk_file",
]

#: dtype name -> (torch dtype, numpy dtype it is stored as)
STORAGE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype(np.float32)),
    "float64": (torch.float64, np.dtype(np.float64)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),  # raw bits; numpy has no bfloat16
}

#: names and shapes of a chunk's accumulators, sorted by name
Layout = list[tuple[str, tuple[int, ...]]]


def dtype_name(dtype: torch.dtype) -> str:
    """The storage name of ``dtype`` (a key of :data:`STORAGE_DTYPES`); a ValueError if a store cannot hold it."""
    for name, (torch_dtype, _) in STORAGE_DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise bad_value(
        "dtype",
        dtype,
        f"a store holds one of {list(STORAGE_DTYPES)}",
        "pass torch.float32, torch.float16 or torch.bfloat16",
    )


# -- the chunk file ------------------------------------------------------------------------------------------------


def chunk_file_name(chunk: int) -> str:
    """The file name of chunk ``chunk`` in the store's directory."""
    return f"chunk-{chunk:06d}.npy"


def check_chunk_features(features: object, chunk: int, start: int, stop: int, dim: int) -> torch.Tensor:
    """``features`` as a tensor after checking that they are the finite ``(stop - start, dim)`` rows of chunk
    ``chunk`` (a ValueError naming the shape, or a FloatingPointError naming the first non-finite row)."""
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(np.asarray(features))
    if features.shape != (stop - start, dim):
        raise bad_value(
            "features",
            features,
            f"chunk {chunk} holds rows {start}:{stop}, so it needs shape ({stop - start}, {dim})",
            "return one row of dim features per example of the chunk",
        )
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features).all(dim=1)).nonzero()[0, 0]) + start
        raise FloatingPointError(
            f"the features of row {bad} (chunk {chunk}) are not finite. Fix: check that training example, the "
            "model's outputs on it, and use float32 features if float16 overflowed (|x| > 65504)."
        )
    return features


def write_chunk_file(path: str | os.PathLike, chunk: int, features: torch.Tensor, dtype: str) -> str:
    """Write finite ``features`` (a tensor) in the storage dtype named ``dtype`` to ``path``, atomically; return
    the file's sha256. A FloatingPointError (naming chunk ``chunk``) if they overflow a 16-bit dtype."""
    torch_dtype, np_dtype = STORAGE_DTYPES[dtype]
    stored = features.detach().to("cpu", torch_dtype).contiguous()
    if torch_dtype == torch.bfloat16:
        array = stored.view(torch.int16).numpy().view(np.uint16)
    else:
        array = stored.numpy()
    if torch_dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(stored).all()):
        raise FloatingPointError(
            f"chunk {chunk} overflows {dtype} (largest feature {float(features.abs().max()):.3g})."
            " Fix: store features as float32 (feature_dtype=torch.float32)."
        )
    contiguous = np.ascontiguousarray(array, np_dtype)

    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, contiguous, allow_pickle=False)

    digest = atomic_write(path, write_npy, checksum=True)
    if digest is None:  # pragma: no cover - atomic_write returns it with checksum=True
        raise RuntimeError("internal error: digest is missing")
    return digest


# np.load parses the .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not thread-safe
# (python/cpython gh-106905: "SystemError: AST constructor recursion depth mismatch" when two threads parse at
# once). The store's read-ahead threads open chunk files concurrently, so the header parse is serialised.
_HEADER_LOCK = threading.Lock()


def read_chunk_file(path: str | os.PathLike, rows: int, dim: int, dtype: str) -> torch.Tensor:
    """The ``(rows, dim)`` features of the chunk file ``path`` in the storage dtype named ``dtype``, as a tensor
    backed by a copy-on-write memory map; a StoreCorruptedError if the file cannot be read or does not match."""
    try:
        with _HEADER_LOCK:  # only the header is read here; the rows are paged in later, outside the lock
            array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise StoreCorruptedError(
            f"chunk file {path} cannot be read ({err}). Fix: store.verify() lists every damaged file; delete "
            "the store and compute it again."
        ) from None
    torch_dtype, np_dtype = STORAGE_DTYPES[dtype]
    if array.shape != (rows, dim) or array.dtype != np_dtype:
        raise StoreCorruptedError(
            f"chunk file {path} holds {array.dtype} {array.shape} but the manifest says {np_dtype} "
            f"({rows}, {dim}). Fix: delete the store and compute it again."
        )
    if torch_dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# -- the report to rank 0 ------------------------------------------------------------------------------------------


def add_accumulators(running: dict[str, torch.Tensor], accumulators: Mapping[str, torch.Tensor]) -> None:
    """Add a chunk's ``accumulators`` to the float64 ``running`` sums in place (a ValueError if a shape differs)."""
    for key, value in accumulators.items():
        value = torch.as_tensor(value).detach().to("cpu", torch.float64)
        if key in running and running[key].shape != value.shape:
            raise bad_value(
                f"accumulators[{key!r}]",
                value,
                f"the running sum has shape {tuple(running[key].shape)}",
                "pass the same shape for every chunk",
            )
        running[key] = running[key] + value if key in running else value.clone()


def accumulator_layout(accumulators: Mapping[str, torch.Tensor]) -> Layout | None:
    """The names and shapes of ``accumulators`` sorted by name, or ``None`` when there are none."""
    return [(k, tuple(accumulators[k].shape)) for k in sorted(accumulators)] or None


def _layout_code(layout: Layout) -> int:
    """A checksum of the accumulators' names and shapes (exact in float64: < 2**32)."""
    return zlib.crc32(json.dumps([[k, list(shape)] for k, shape in layout]).encode())


def encode_report(
    chunk: int, sha256: str, accumulators: Mapping[str, torch.Tensor] | None
) -> tuple[Layout, torch.Tensor]:
    """The layout of ``accumulators`` (``[]`` when there are none) and the ``(1, 34 + size)`` float64 row that
    reports chunk ``chunk``, its file's ``sha256`` (hex) and its accumulators."""
    if accumulators:
        values = {k: torch.as_tensor(v).detach().to("cpu", torch.float64) for k, v in accumulators.items()}
        layout = [(k, tuple(values[k].shape)) for k in sorted(values)]
        flat = torch.cat([values[k].reshape(-1) for k, _ in layout])
    else:
        layout, flat = [], torch.zeros(0, dtype=torch.float64)
    row = torch.cat(
        [
            torch.tensor([chunk, _layout_code(layout)], dtype=torch.float64),
            torch.tensor(list(bytes.fromhex(sha256)), dtype=torch.float64),
            flat,
        ]
    )
    return layout, row[None]


def decode_reports(
    rows: torch.Tensor, layout: Layout | None
) -> list[tuple[int, str, dict[str, torch.Tensor] | None]]:
    """``(chunk, sha256, accumulators or None)`` of every gathered row, in chunk order; ``layout`` is the one the
    accumulators were written with (``None`` if unknown: then no row may carry accumulators)."""
    reports = []
    for row in sorted(rows.to("cpu", torch.float64), key=lambda r: int(r[0])):
        chunk, code = int(row[0]), int(row[1])
        sha = bytes(int(b) for b in row[2:34]).hex()
        flat = row[34:]
        acc: dict[str, torch.Tensor] | None
        if code == _layout_code([]):
            acc = None
        elif layout is None or code != _layout_code(layout):
            raise RuntimeError(
                f"internal error: rank 0 cannot decode the accumulators of chunk {chunk} (their names and "
                "shapes are unknown here or differ). Fix: every rank must run the same compute function."
            )
        else:
            acc, offset = {}, 0
            for name, shape in layout:
                size = math.prod(shape)
                acc[name] = flat[offset : offset + size].reshape(shape).clone()
                offset += size
        reports.append((chunk, sha, acc))
    return reports
