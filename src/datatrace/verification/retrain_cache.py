"""The resumable cache of :mod:`datatrace.verification.retrain`: one ``<key>.npy`` per finished retrain plus a
``manifest.json`` naming the request (training data sha256, indices, subsets, seeds), written atomically.

A cache refuses a request that differs from the one it was made for, and result files without a manifest, so a
rerun never mixes results of different runs or data.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from datatrace.errors import bad_value
from datatrace.fileio import atomic_write

__all__ = ["FORMAT_VERSION", "MANIFEST", "RetrainCache"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FIELD_MEANINGS = {
    "train_sha256": " (the training data differ: a cache never serves results of other data)",
    "indices_sha256": " (the left-out indices differ)",
    "masks_sha256": " (the subsets differ)",
    "seeds_sha256": " (the per-run seeds differ)",
    "seed_passed": " (train_fn's signature changed: it does or does not take a seed now)",
    "format": " (written by another version of datatrace)",
}
JOB_FILE = re.compile(r"^(base|loo-\d+|subset-\d+-seed-\d+)\.npy$")


class RetrainCache:
    """A directory of finished retrains: one ``<key>.npy`` per job plus ``manifest.json``."""

    def __init__(self, cache_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
        try:
            self.path = Path(cache_dir)
        except TypeError:
            raise bad_value(
                "cache_dir",
                cache_dir,
                "expected a directory path (str or os.PathLike)",
                "pass e.g. 'loo-cache'",
            ) from None
        if self.path.exists() and not self.path.is_dir():
            raise bad_value(
                "cache_dir", cache_dir, "the path exists and is not a directory", "pass a directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        manifest_path = self.path / MANIFEST
        wanted = {"format": FORMAT_VERSION, **config}
        if manifest_path.exists():
            try:
                stored = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"cache_dir={str(self.path)!r} has an unreadable {MANIFEST} ({error}). "
                    "Fix: use a new cache_dir, or delete this one."
                ) from None
            if not isinstance(stored, dict):
                stored = {}
            for field, value in wanted.items():
                if stored.get(field, "<missing>") != value:
                    meaning = FIELD_MEANINGS.get(field, "")
                    raise ValueError(
                        f"cache_dir={str(self.path)!r} holds results of a different run{meaning}: its {MANIFEST} "
                        f"has {field}={stored.get(field, '<missing>')!r} but this call has {field}={value!r}. "
                        "Fix: use a new cache_dir for this configuration (or call with the original arguments to "
                        "resume that run)."
                    )
            self.n_query: int | None = stored.get("n_query")
            self.manifest = stored
        else:
            leftovers = sorted(p.name for p in self.path.iterdir() if JOB_FILE.match(p.name))
            if leftovers:
                raise ValueError(
                    f"cache_dir={str(self.path)!r} holds result files ({', '.join(leftovers[:3])}, ...) but no "
                    f"{MANIFEST}, so it is unknown which run they belong to. Fix: use a new cache_dir."
                )
            self.n_query = None
            self.manifest = wanted
            self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write(
            self.path / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(self.manifest, indent=2))
        )

    def set_n_query(self, n_query: int) -> None:
        self.n_query = int(n_query)
        self.manifest = {**self.manifest, "n_query": self.n_query}
        self._write_manifest()

    def load(self, key: str) -> np.ndarray | None:
        path = self.path / f"{key}.npy"
        if not path.exists():
            return None
        try:
            out = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            logger.warning("Ignoring unreadable cached result %s (%s); it will be retrained.", path, error)
            return None
        return np.asarray(out, dtype=np.float64)

    def save(self, key: str, outputs: np.ndarray) -> None:
        array = np.ascontiguousarray(outputs, dtype=np.float64)
        atomic_write(self.path / f"{key}.npy", lambda tmp: save_npy(tmp, array))


def save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array, allow_pickle=False)
