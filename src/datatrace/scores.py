"""Influence scores: the query x train matrix and what people ask of it.

``values[q, i]`` estimates ``f_q(theta_{-i}) - f_q(theta_hat)``: how much query ``q``'s measurement (by default its
loss) would change if training example ``i`` were removed and the model retrained, in the measurement's own
units. Positive on a loss: removing ``i`` raises the query's loss, so ``i`` helped the query (a *proponent*).
Negative: removing ``i`` lowers the loss, so ``i`` hurt it (an *opponent*).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from datatrace.errors import bad_value, check_positive_int
from datatrace.fileio import atomic_write

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
        values = torch.as_tensor(values)
        if values.dim() != 2:
            raise bad_value("values", values, "expected a 2-D tensor (n_query, n_train)", "reshape it")
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
        if isinstance(q, bool) or not isinstance(q, int) or not -self.n_query <= q < self.n_query:
            raise IndexError(
                f"q={q!r} is out of range for {self.n_query} queries: allowed is an int with "
                f"-{self.n_query} <= q < {self.n_query}. Fix: pass the row number of the query."
            )
        return q % self.n_query

    def top_k(self, k: int) -> TopK:
        """For every query, the ``k`` training examples with the largest ``|score|`` (shape ``(n_query, k)``)."""
        k = self._check_k(k)
        _, idx = torch.topk(self.values.abs(), k, dim=1)
        return TopK(idx, torch.gather(self.values, 1, idx))

    def proponents(self, q: int, k: int = 10) -> TopK:
        """The ``k`` most helpful training examples of query ``q``: largest positive scores first."""
        q, k = self._check_query(q), self._check_k(k)
        values, idx = torch.topk(self.values[q], k)
        keep = values > 0
        return TopK(idx[keep], values[keep])

    def opponents(self, q: int, k: int = 10) -> TopK:
        """The ``k`` most harmful training examples of query ``q``: most negative scores first."""
        q, k = self._check_query(q), self._check_k(k)
        values, idx = torch.topk(-self.values[q], k)
        keep = values > 0
        return TopK(idx[keep], -values[keep])

    def total(self) -> torch.Tensor:
        """Sum over queries, shape ``(n_train,)``: the first-order effect of removing ``i`` on the summed
        measurement (e.g. the total validation loss), which is how data are valued."""
        return self.values.sum(dim=0)

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, the values) and ``path.json`` (metadata) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "datatrace.Scores",
            "version": FORMAT_VERSION,
            "measurement": self.measurement,
            "meaning": MEANING,
            "shape": list(self.values.shape),
            "metadata": self.metadata,
        }
        try:
            meta_text = json.dumps(meta, indent=2, sort_keys=True)
        except TypeError as err:
            raise ValueError(
                f"Scores.metadata must be JSON-serialisable: {err}. Fix: store plain values."
            ) from err
        json_path = path.with_name(path.name + ".json")
        atomic_write(path, lambda tmp: save_file({"values": self.values.contiguous()}, tmp))
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(meta_text))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Read scores written by :meth:`save` (no pickle: safetensors and JSON only)."""
        path = Path(path)
        json_path = path.with_name(path.name + ".json")
        for p in (path, json_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist. Fix: pass the path given to Scores.save().")
        meta: dict[str, Any] = json.loads(json_path.read_text())
        if meta.get("format") != "datatrace.Scores":
            raise ValueError(f"{json_path} is not a datatrace Scores file (format={meta.get('format')!r}).")
        values = load_file(str(path))["values"]
        if list(values.shape) != meta["shape"]:
            raise ValueError(
                f"{path} holds values of shape {list(values.shape)} but its metadata says {meta['shape']}: the "
                "pair was not written together. Fix: save the scores again."
            )
        return cls(values, meta.get("measurement", ""), meta.get("metadata", {}))
