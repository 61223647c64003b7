"""The command line's data files: flagged-example lists it reads, per-example tables it writes.

``--flagged FILE`` (``datatrace debug``) names training examples known to be bad: text with one index per line
(or separated by commas or spaces, ``#`` starts a comment), a ``.json`` list or a ``.npy`` array (read with
``allow_pickle=False``, so a file can never run code). :func:`write_csv` writes equal-length columns at full float
precision, atomically (:func:`datatrace.fileio.atomic_write`), so a reader never sees half a table.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from datatrace.errors import UsageError
from datatrace.fileio import atomic_write

__all__ = ["read_flagged", "write_csv"]


def read_flagged(path: str | os.PathLike[str], n: int) -> np.ndarray:
    """A bool mask of length ``n`` from a file of training indices.

    Accepted: text with integers separated by commas, spaces or new lines (``#`` starts a comment), a ``.json``
    list of integers, or a ``.npy`` array (read with ``allow_pickle=False``): integers are indices, booleans a
    mask of length ``n``.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"--flagged {str(file)!r}: no such file. Fix: pass a file of flagged training indices."
        )
    try:
        if file.suffix == ".npy":
            values = np.load(file, allow_pickle=False)
        elif file.suffix == ".json":
            values = np.asarray(json.loads(file.read_text()))
        else:
            tokens = []
            for line in file.read_text().splitlines():
                line = line.split("#", 1)[0]
                tokens += [t for t in line.replace(",", " ").split() if t]
            values = np.asarray([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OSError) as err:
        raise UsageError(
            f"--flagged {str(file)!r} could not be read as training indices ({err}). Fix: write one integer index "
            "per line (or a JSON list, or a .npy array)."
        ) from None
    values = np.asarray(values).reshape(-1)
    if values.dtype == bool:
        if values.size != n:
            raise UsageError(
                f"--flagged {str(file)!r} holds a mask of {values.size} booleans but train() has {n} examples. "
                f"Fix: give one boolean per training example, or a list of indices."
            )
        mask = values
    else:
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise UsageError(
                f"--flagged {str(file)!r} holds non-integers. Fix: list integer training indices."
            )
        bad = values[(values < 0) | (values >= n)]
        if bad.size:
            raise UsageError(
                f"--flagged {str(file)!r} contains index {int(bad[0])}, out of range for {n} training examples. "
                f"Fix: list indices between 0 and {n - 1}."
            )
        mask = np.zeros(n, dtype=bool)
        mask[values.astype(np.int64)] = True
    if not mask.any():
        raise UsageError(f"--flagged {str(file)!r} flags no training example. Fix: list at least one index.")
    return mask


def write_csv(path: Path, columns: dict[str, Any]) -> Path:
    """Write equal-length columns to ``path`` (full float precision, atomically); returns ``path``."""
    names = list(columns)
    arrays = [list(np.asarray(columns[c]).tolist()) for c in names]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(names)
            for row in zip(*arrays):
                writer.writerow([repr(v) if isinstance(v, float) else v for v in row])

    atomic_write(path, write)
    return path
