"""Fingerprints: what a set of stored training features was computed from, and how two such records differ.

Features ``phi_i = P^T grad l(z_i, theta_hat)`` depend on the model's parameters ``theta_hat``, the data ``z_i``, the
projection ``P``, the task and the settings. A :class:`~datatrace.projection.store.GradientStore` records a JSON
*fingerprint* of each (sha256 digests, facts) and refuses to mix features whose fingerprints differ, naming the
one that differs, in the spirit of the content-addressed caches of TRAK (Park et al. 2023) and kronfluence.

The data fingerprint hashes the content of *every* example (:meth:`~datatrace.data.DataSource.content_sha256`:
one read of the data, far cheaper than the gradient pass that fills a store), so a single changed example anywhere
makes a stored set of features stale. It records the ``scheme`` it was made with
(:data:`DATA_FINGERPRINT_SCHEME`); a fingerprint made by another scheme (for example by an older datatrace, which
hashed only the first and last examples of a large or lazily loaded data set) cannot be compared, so a store
carrying one is refused with a message that says so, never matched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from datatrace.data import DataSource
from datatrace.errors import bad_value

__all__ = [
    "DATA_FINGERPRINT_SCHEME",
    "SCHEME_DIFFERS",
    "canonical_json",
    "data_fingerprint",
    "fingerprint_difference",
    "model_fingerprint",
]

#: how :func:`data_fingerprint` hashes a data set; a new way of hashing gets a new scheme
DATA_FINGERPRINT_SCHEME = "datatrace-data/2: sha256 of every example's content"
#: how :func:`fingerprint_difference` starts its text when two fingerprints were made by different schemes
SCHEME_DIFFERS = "fingerprinted by another scheme"
#: what a differing fingerprint means, in words
_FINGERPRINT_WORDS = {
    "model": "a different model (its parameter values differ)",
    "data": "different training data",
    "projection": "a different projection (kind, dimension or seed)",
    "task": "a different task (loss or weight decay)",
    "config": "different settings",
}


# -- computing fingerprints ----------------------------------------------------------------------------------------


def _hash_tensor(digest: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    digest.update(t.numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the names, shapes, dtypes and bytes of every parameter and buffer of ``model``."""
    digest = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        if isinstance(t, torch.Tensor):
            _hash_tensor(digest, name, t)
    return digest.hexdigest()


def data_fingerprint(source: DataSource) -> dict[str, Any]:
    """Identity of a data set: its length and the sha256 of every example's content (dtype, shape and bytes of
    each element, in order; :meth:`~datatrace.data.DataSource.content_sha256`), whatever its form (tensors,
    arrays or a Dataset) and batch size, with the ``scheme`` that made it."""
    return {"scheme": DATA_FINGERPRINT_SCHEME, "n": len(source), "sha256": source.content_sha256()}


# -- comparing fingerprints ----------------------------------------------------------------------------------------


def canonical_json(value: Any) -> Any:
    """Round-trip through JSON so that stored and fresh fingerprints compare equal (tuples become lists...)."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except TypeError as err:
        raise bad_value(
            "fingerprints",
            value,
            f"fingerprints must be JSON values ({err})",
            "pass strings, numbers, lists, dicts",
        ) from None


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12] + "..."  # a sha256
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(stored: Any, fresh: Any, prefix: str = "") -> list[str]:
    """Human-readable leaf differences between two JSON values."""
    if isinstance(stored, dict) and isinstance(fresh, dict):
        out = []
        for key in sorted(set(stored) | set(fresh), key=str):
            out += _differences(stored.get(key, "<missing>"), fresh.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    if stored != fresh:
        return [f"{prefix.rstrip('.') or 'value'}: stored {_short(stored)} vs now {_short(fresh)}"]
    return []


def fingerprint_difference(stored: Mapping[str, Any], fresh: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first fingerprint (in key order) that differs between two canonical records, as ``(key, text)`` where
    ``text`` reads "computed from <what that means>: its '<key>' fingerprint differs (<leaf differences>)";
    ``None`` when they are the same."""
    for key in sorted(set(stored) | set(fresh)):
        old, new = stored.get(key, "<missing>"), fresh.get(key, "<missing>")
        if isinstance(old, dict) and isinstance(new, dict) and old.get("scheme") != new.get("scheme"):
            made = old.get("scheme", "an older one, without a scheme")
            return key, (
                f"{SCHEME_DIFFERS}: its {key!r} fingerprint was made by {_short(made)!r}, this "
                f"datatrace makes {_short(new.get('scheme', '<none>'))!r}, so it cannot tell whether the store "
                "matches and never reuses it"
            )
        if old != new:
            words = _FINGERPRINT_WORDS.get(key, f"a different {key!r}")
            details = "; ".join(_differences(old, new)[:4])
            return key, f"computed from {words}: its {key!r} fingerprint differs ({details})"
    return None
