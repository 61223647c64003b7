"""Influence scores: the query x train matrix and what people ask of it.

``values[q, i]`` estimates ``f_q(theta_{-i}) - f_q(theta_hat)``: how much query ``q``'s measurement (by default its
loss) would change if training example ``i`` were removed and the model retrained, in the measurement's own
units. Positive on a loss: removing ``i`` raises the query's loss, so ``i`` helped the query (a *proponent*).
Negative: removing ``i`` lowers the loss, so ``i`` hurt it (an *opponent*).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from datatrace.errors import ScoresFileError, bad_value, check_positive_int, describe
from datatrace.fileio import atomic_write, sha256_file

MEANING = (
    "score[q, i] estimates f_q(theta_without_i) - f_q(theta_hat): the change of query q's measurement when "
    "training example i is removed and the model retrained (leave-one-out, first order), in the measurement's "
    "units. Positive on a loss = removing i raises the query's loss: i is a proponent (helpful). Negative = i is "
    "an opponent (harmful)."
)
FORMAT_VERSION = 1


class TopK(NamedTuple):
    """``indices`` of training examples and their ``values``, best first."""

    indices: torch.Tensor
    values: torch.Tensor


class Scores:
    """A query x train matrix of leave-one-out influence estimates, with metadata.

    Args:
        values: tensor of shape ``(n_query, n_train)``.
        measurement: words for what the query measurement is (e.g. ``"the query's loss"``).
        metadata: JSON-serialisable facts about how the scores were made (estimator, curvature, damping...).
    """

    def __init__(
        self, values: torch.Tensor, measurement: str = "the query's loss", metadata: dict | None = None
    ):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            raise bad_value(
                "values", values, "expected a 2-D numeric tensor (n_query, n_train)", "pass a tensor or array"
            ) from None
        if values.dim() != 2:
            raise bad_value("values", values, "expected a 2-D tensor (n_query, n_train)", "reshape it")
        if not isinstance(measurement, str):
            raise bad_value(
                "measurement",
                measurement,
                "expected a string",
                'describe the measurement, e.g. "the query\'s loss"',
            )
        if metadata is not None and not isinstance(metadata, Mapping):
            raise bad_value(
                "metadata", metadata, "expected a dict or None", "pass a dict of JSON-serialisable facts"
            )
        self.values = values
        self.measurement = measurement
        self.metadata = dict(metadata or {})

    @property
    def n_query(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.values.shape[1])

    @property
    def meaning(self) -> str:
        return MEANING

    def __repr__(self) -> str:
        return f"Scores(n_query={self.n_query}, n_train={self.n_train}, measurement={self.measurement!r})"

    # -- selection ---------------------------------------------------------------------------------------------
    def _check_k(self, k: int) -> int:
        check_positive_int("k", k)
        return min(k, self.n_train)

    def _check_query(self, q: int) -> int:
        if isinstance(q, np.integer):
            q = int(q)  # e.g. an index read from a numpy array
        if isinstance(q, bool) or not isinstance(q, int) or not -self.n_query <= q < self.n_query:
            raise IndexError(
                f"q={q!r} is out of range for {self.n_query} queries: allowed is an int with "
                f"-{self.n_query} <= q < {self.n_query}. Fix: pass the row number of the query."
            )
        return q % self.n_query

    def top_k(self, k: int) -> TopK:
        """For every query, the ``k`` training examples with the largest ``|score|`` (shape ``(n_query, k)``)."""
        k = self._check_k(k)
        # NaN (not scored, e.g. off a shortlist: ShortlistScores.to_dense) ranks below every score, not above
        _, idx = torch.topk(torch.nan_to_num(self.values.abs(), nan=-1.0), k, dim=1)
        return TopK(idx, torch.gather(self.values, 1, idx))

    def _signed_top(self, q: int, k: int, sign: float) -> TopK:
        q, k = self._check_query(q), self._check_k(k)
        values, idx = torch.topk(torch.nan_to_num(sign * self.values[q], nan=-math.inf), k)
        keep = values > 0  # NaN (not scored) is never picked
        return TopK(idx[keep], sign * values[keep])

    def proponents(self, q: int, k: int = 10) -> TopK:
        """The ``k`` most helpful training examples of query ``q``: largest positive scores first (NaN, not
        scored, left out)."""
        return self._signed_top(q, k, 1.0)

    def opponents(self, q: int, k: int = 10) -> TopK:
        """The ``k`` most harmful training examples of query ``q``: most negative scores first (NaN left out)."""
        return self._signed_top(q, k, -1.0)

    def total(self) -> torch.Tensor:
        """Sum over queries, shape ``(n_train,)``: the first-order effect of removing ``i`` on the summed
        measurement (e.g. the total validation loss), which is how data are valued."""
        return self.values.sum(dim=0)

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, the values) and ``path.json`` (metadata) atomically."""
        path = Path(path)
        if path.is_dir():
            raise bad_value(
                "path",
                str(path),
                "it is a folder; Scores.save writes one file (the values) and path.json beside it",
                f"pass a file path, e.g. {str(path / 'scores.safetensors')!r}",
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(path.parent, os.W_OK):
                raise PermissionError(f"no write permission in {path.parent}")
        except OSError as err:
            raise bad_value(
                "path",
                str(path),
                f"its folder cannot be created or written ({err})",
                "pass a path you can write",
            ) from err
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "measurement": self.measurement,
            "meaning": MEANING,
            "shape": list(self.values.shape),
            "dtype": _DTYPE_NAMES.get(self.values.dtype, str(self.values.dtype)),
            "metadata": self.metadata,
        }
        try:
            json.dumps(meta)
        except TypeError as err:
            raise ValueError(
                f"Scores.metadata must be JSON-serialisable: {err}. Fix: store plain values."
            ) from err
        json_path = path.with_name(path.name + ".json")
        meta["sha256"] = atomic_write(
            path, lambda tmp: save_file({"values": self.values.contiguous()}, tmp), checksum=True
        )
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(meta_text))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read scores written by :meth:`save` (no pickle: safetensors and JSON only).

        Both files are checked against each other before anything is returned: the JSON must be the object
        :meth:`save` writes (every key present, of its type, no unknown key) and the safetensors file must hold
        exactly one tensor ``values`` whose shape and dtype are the ones the JSON records, and whose bytes have the
        sha256 the JSON records (files written before the digest was recorded have none to check). A pair that fails any
        check raises :class:`~datatrace.errors.ScoresFileError` naming the file; a missing file raises
        ``FileNotFoundError``.
        """
        path = Path(path)
        json_path = path.with_name(path.name + ".json")
        for p in (path, json_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist. Fix: pass the path given to Scores.save().")
            if not p.is_file():
                raise _file_error(p, "is not a regular file")
        meta = _read_meta(json_path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise _file_error(path, f"is not a readable safetensors file ({error})") from None
        if sorted(tensors) != ["values"]:
            raise _file_error(path, f"holds the tensors {sorted(tensors)}; a Scores file holds one, 'values'")
        values = tensors["values"]
        if list(values.shape) != meta["shape"]:
            raise ScoresFileError(
                f"{path} holds values of shape {list(values.shape)} but its metadata says {meta['shape']}: the "
                "pair was not written together. Fix: save the scores again."
            )
        dtype = _DTYPE_NAMES.get(values.dtype, str(values.dtype))
        if dtype != meta.get("dtype", dtype) or not (values.is_floating_point() or "dtype" in meta):
            raise ScoresFileError(
                f"{path} holds values of dtype {dtype} but its metadata {json_path.name} says "
                f"{meta.get('dtype', 'a floating-point dtype')}: the pair was not written together. "
                "Fix: save the scores again."
            )
        if "sha256" in meta and sha256_file(path) != meta["sha256"]:
            raise _file_error(
                path, f"does not have the sha256 recorded in {json_path.name} (its bytes changed)"
            )
        return cls(values, meta["measurement"], meta["metadata"])


FORMAT_NAME = "datatrace.Scores"
_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
# the JSON written by Scores.save: key -> (type check, words for the message). "dtype" and "sha256" (of the values
# file) are optional: files written before they were recorded hold floating-point values and have no digest.
_META_KEYS: dict[str, tuple[Any, str]] = {
    "format": (lambda v: v == FORMAT_NAME, f"the string {FORMAT_NAME!r}"),
    "version": (lambda v: type(v) is int and v == FORMAT_VERSION, f"the integer {FORMAT_VERSION}"),
    "measurement": (lambda v: isinstance(v, str), "a string"),
    "meaning": (lambda v: isinstance(v, str), "a string"),
    "shape": (
        lambda v: isinstance(v, list) and len(v) == 2 and all(type(d) is int and d >= 0 for d in v),
        "a list of two non-negative integers [n_query, n_train]",
    ),
    "dtype": (lambda v: v in _DTYPE_NAMES.values(), f"one of {sorted(_DTYPE_NAMES.values())}"),
    "metadata": (lambda v: isinstance(v, dict), "a JSON object"),
    "sha256": (
        lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
        "a sha256 hex digest",
    ),
}
_OPTIONAL_KEYS = frozenset({"dtype", "sha256"})


def _file_error(path: Path, problem: str) -> ScoresFileError:
    return ScoresFileError(
        f"{path} {problem}, so it is not a Scores file written by Scores.save() (or it was changed or truncated "
        "since). Fix: save the scores again with Scores.save(), or pass the path of an intact pair."
    )


def _read_meta(json_path: Path) -> dict[str, Any]:
    """The JSON half of a Scores pair, every key checked (ScoresFileError otherwise)."""
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _file_error(json_path, f"is not readable JSON ({error})") from None
    if not isinstance(meta, dict):
        raise _file_error(json_path, f"holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_NAME:
        raise _file_error(json_path, f"is not a datatrace Scores file (format={meta.get('format')!r})")
    unknown = sorted(set(meta) - set(_META_KEYS))
    if unknown:
        raise _file_error(json_path, f"has unknown key(s) {unknown}; allowed are {sorted(_META_KEYS)}")
    for key, (valid, allowed) in _META_KEYS.items():
        if key not in meta:
            if key in _OPTIONAL_KEYS:
                continue
            raise _file_error(json_path, f"has no {key!r} key")
        if not valid(meta[key]):
            raise _file_error(json_path, f"has {key}={describe(meta[key])}; expected {allowed}")
    return meta
