"""Small file helpers shared by everything that writes: atomic writes, checksums, JSON without NaN.

A file that datatrace writes is either complete or absent: it is written to a temporary file in the same folder,
flushed to disk and renamed over the target (``os.replace`` is atomic on POSIX and Windows), so an interrupted run
never leaves a half-written file that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "jsonable", "sha256_file", "write_json"]


def sha256_file(path: str | os.PathLike[str], block: int = 2**22) -> str:
    """The hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[str], Any], checksum: bool = False
) -> str | None:
    """Write ``path`` by calling ``write(temporary_path)``, fsync it, then rename it over ``path``.

    The temporary file is ``.<name>.<random>.tmp`` beside ``path`` (so it never looks like a finished file) and is
    removed if anything fails. Returns the file's sha256 when ``checksum`` is true.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp) if checksum else None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return digest


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars and arrays to Python, NaN/inf to None, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        x = float(value)
        return x if math.isfinite(x) else None
    return value


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON (NaN/inf as null), atomically."""
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)
