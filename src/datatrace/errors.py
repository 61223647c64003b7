"""The project's exceptions, and input validation shared by every module.

Every error raised for bad user input names the argument, the value received, what is allowed and how to fix it.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


# --------------------------------------------------------------------------------------------------------------
# The project's exception and warning classes (every one of them lives here)
# --------------------------------------------------------------------------------------------------------------
class NotFittedError(RuntimeError):
    """Raised when a method that needs ``fit`` is called on an attributor that was not fitted."""


class ConvergenceWarning(RuntimeWarning):
    """An iterative solve stopped before its tolerance, or met curvature it could not handle."""


class StoreMismatchError(ValueError):
    """The directory holds a store computed from something else (a different model, data set or projection)."""


class StoreCorruptedError(RuntimeError):
    """A file of the store is missing, truncated or does not match its recorded checksum."""


class ScoresFileError(ValueError):
    """A saved :class:`~datatrace.scores.Scores` pair (values ``.safetensors`` + ``.json``) that is malformed,
    truncated or tampered with: the message names the file and the fix (save the scores again)."""


class RetrainCacheError(ValueError):
    """A retraining cache (``cache_dir``) whose manifest or result files are malformed, tampered with or not plain
    files inside the cache folder: the message names the file and the fix (use a new ``cache_dir``)."""


class StoreLockedError(RuntimeError):
    """Another process holds the store's fill lock (two fills of one store would both compute every chunk)."""


class UsageError(ValueError):
    """A bad command-line value (reported by the CLI with exit code 2)."""


class SpecError(UsageError):
    """A spec file that does not define what a command needs, or defines it wrongly (exit code 2)."""


class SpecRuntimeError(RuntimeError):
    """The user's own code in a spec file raised an exception (the original is chained as ``__cause__``)."""


# --------------------------------------------------------------------------------------------------------------
# Messages for bad user input
# --------------------------------------------------------------------------------------------------------------


def describe(value: Any, limit: int = 80) -> str:
    """A short, safe rendering of a user value for an error message."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, np.ndarray):
        return f"ndarray(shape={value.shape}, dtype={value.dtype})"
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and not isinstance(value, (np.generic, str, bytes)):
        return f"{type(value).__name__}(shape={shape})"  # pandas, scipy sparse, other array-likes
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_value(name: str, value: Any, allowed: str, fix: str) -> ValueError:
    """Build a ValueError in the project's standard form."""
    return ValueError(f"{name}={describe(value)} is not allowed: {allowed}. Fix: {fix}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise bad_value(name, value, f"expected one of {choices}", f"pass one of {choices}")
    return value


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int (numpy integers accepted, bools not), else the project's error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise bad_value(name, value, f"expected an integer >= {minimum}", f"pass an integer >= {minimum}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (numpy's included), else the project's error naming ``name``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise bad_value(name, value, "expected True or False", f"pass {name}=True or {name}=False")


def check_random_state(random_state: Any) -> int:
    """An ``int`` seed (not a bool), with the project's error message otherwise."""
    try:
        if isinstance(random_state, bool):
            raise TypeError
        seed = operator.index(random_state)
        if seed < 0:
            raise TypeError
        return seed
    except TypeError:
        raise bad_value(
            "random_state", random_state, "expected an int seed >= 0", "pass e.g. random_state=0"
        ) from None


def check_folder(name: str, value: Any) -> Any:
    """``None`` or a folder path (``str`` / ``os.PathLike``), else the project's error naming ``name``."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return value
    raise bad_value(
        name, value, "expected a folder path (str or os.PathLike) or None", f"pass e.g. {name}='out'"
    )


def check_nonnegative_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise bad_value(name, value, "expected a non-negative number, not a bool", "pass a float >= 0")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise bad_value(name, value, "expected a non-negative number", "pass a float >= 0") from None
    if not out >= 0.0 or out == float("inf"):
        raise bad_value(name, value, "expected a finite non-negative number", "pass a float >= 0")
    return out


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocator failure rather than a problem with the inputs: Python's ``MemoryError``,
    torch's ``OutOfMemoryError`` (CUDA), or the RuntimeError of torch's CPU allocator ("not enough memory")."""
    if isinstance(err, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom and isinstance(err, oom):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("not enough memory" in text or "out of memory" in text)


def check_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise if ``tensor`` holds NaN or inf, saying where (first offending index) and what to change."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            count = int(bad.sum())
            value = tensor[first].item() if tensor.dim() else tensor.item()
            msg = f"{what} contains {count} non-finite value(s) (first at index {first}: {value})."
            raise FloatingPointError(msg + (" " + hint if hint else ""))


def check_indices(name: str, indices: Any, n: int) -> torch.Tensor:
    """Validate integer indices into a collection of ``n`` items and return them as a 1-D long tensor."""
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError):
        raise bad_value(name, indices, "expected integer indices", "pass a list or tensor of ints") from None
    if idx.dim() == 0:
        idx = idx.reshape(1)
    if idx.dim() != 1 or (idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool)):
        raise bad_value(name, indices, "expected a 1-D sequence of integer indices", "pass a list of ints")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        bad = idx[(idx < -n) | (idx >= n)][0].item()
        raise IndexError(
            f"{name} contains {bad}, out of range for {n} training examples: allowed is -{n} <= index < {n}. "
            f"Fix: pass indices between 0 and {n - 1}."
        )
    return torch.where(idx < 0, idx + n, idx)
