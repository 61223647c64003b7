"""The command line's data files: flagged-example lists it reads, per-example tables it writes.

``--flagged FILE`` (``datatrace debug``) names training examples known to be bad: text with one index per line
(or separated by commas or spaces, ``#`` starts a comment), a ``.json`` list or a ``.npy`` array (read with
``allow_pickle=False``, so a file can never run code). :func:`write_csv` writes equal-length columns at full float
precision, atomically (:func:`datatrace.fileio.atomic_write`), so a reader never sees half a table.

:func:`publish` makes a run's outputs appear together or not at all: every output file is written into a fresh
hidden folder beside ``--out`` and the folder is swapped in at the end, so an interrupted rerun into an ``--out``
holding an earlier report leaves that report, its ``results.json`` and its tables whole and consistent with each
other (never a new CSV beside an old report). What is not an output (resumable caches such as ``verify-cache/`` and
``loo-cache/``, the user's own files) is carried into the new folder, so it survives every run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from datatrace.errors import UsageError
from datatrace.fileio import atomic_write

__all__ = ["OUTPUT_NAMES", "publish", "read_flagged", "write_csv"]

logger = logging.getLogger(__name__)

#: every file a command writes to ``--out``: what a new run replaces (or removes when it does not write it again)
OUTPUT_NAMES = frozenset(
    {
        "report.html",
        "results.json",
        "per_example.csv",
        "values.csv",
        "values.parquet",
        "scores.safetensors",
        "scores.safetensors.json",
        "loo.npz",
    }
)


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


def publish(out: Path, writers: Mapping[str, Callable[[Path], Any]]) -> None:
    """Write a run's outputs (``writers``: file name -> ``write(path)``) and swap them into ``out`` together.

    The files are written into a new hidden folder ``.<out>.new-*`` in ``out``'s parent; then every entry of
    ``out`` that is not an output (:data:`OUTPUT_NAMES`: caches, the user's files) is moved into it, ``out`` is
    renamed away, the new folder renamed to ``out`` and the old one deleted. Until the swap, ``out`` is untouched;
    the swap itself (a few renames) defers Ctrl-C until it is done. Outputs of an earlier run that this run does
    not write again are dropped, so ``out`` never holds files that its ``results.json`` does not describe.

    Where the swap is impossible (``out`` is the working directory or holds it, is a symlink, or its parent is not
    writable) the files are moved in one by one instead (each still whole).
    """
    out = Path(out)
    unknown = set(writers) - OUTPUT_NAMES
    if unknown:  # pragma: no cover - a programming error in a command
        raise ValueError(f"publish: {sorted(unknown)} are not in OUTPUT_NAMES; add them there.")
    stage = None
    if not _holds_cwd(out) and not out.is_symlink():
        with contextlib.suppress(OSError):
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.resolve().parent))
    if stage is None:
        stage = Path(tempfile.mkdtemp(prefix=".new-", dir=out))
        try:
            for name, write in writers.items():
                write(stage / name)
            with _deferred_interrupt():
                _move_in(stage, out, writers)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return
    try:
        for name, write in writers.items():
            write(stage / name)
        with contextlib.suppress(OSError):
            os.chmod(stage, os.stat(out).st_mode & 0o7777)  # mkdtemp makes an owner-only folder
        with _deferred_interrupt():
            _swap(out, stage, writers)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _holds_cwd(out: Path) -> bool:
    try:
        cwd, target = Path.cwd().resolve(), out.resolve()
    except OSError:  # pragma: no cover - a deleted working directory
        return True
    return cwd == target or target in cwd.parents


def _swap(out: Path, stage: Path, writers: Mapping[str, Any]) -> None:
    carried = []
    for entry in sorted(out.iterdir()):
        if entry.name in OUTPUT_NAMES or (stage / entry.name).exists():
            continue
        os.rename(entry, stage / entry.name)
        carried.append(entry.name)
    old = out.resolve().parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    try:
        os.rename(out, old)
    except OSError as err:  # e.g. out is a mount point: put the carried entries back and move files in
        logger.info("could not swap %s in one step (%s); moving the files in one by one", out, err)
        for name in carried:
            os.rename(stage / name, out / name)
        _move_in(stage, out, writers)
        return
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _move_in(stage: Path, out: Path, writers: Mapping[str, Any]) -> None:
    for name in OUTPUT_NAMES - set(writers):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for name in writers:
        if (stage / name).exists():
            os.replace(stage / name, out / name)


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) while the block runs and raise KeyboardInterrupt after it (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
