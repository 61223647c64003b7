"""The resumable cache of :mod:`datatrace.verification.retrain`: one ``<key>.npy`` per finished retrain plus a
``manifest.json`` naming the request (training data sha256, indices, subsets, seeds), written atomically.

A cache refuses a request that differs from the one it was made for, and result files without a manifest, so a
rerun never mixes results of different runs or data. The manifest also records the sha256 of every result file
(``results``: job key -> digest), so a result whose bytes changed on disk (a flipped bit, a partial copy) is
noticed and retrained rather than served. The manifest is rewritten at most once every
:data:`FLUSH_SECONDS` while results arrive, and once at the end or on an exception, so a long run does not rewrite
a growing manifest after every retrain; a hard kill loses at most that many seconds of results (their files exist
but have no recorded digest, and are retrained with a warning).

Files in the folder are treated as untrusted input. The manifest must be a plain file holding the JSON object this
module writes (the request's fields with their JSON types, ``format``, ``n_query`` and ``results``, nothing
else; ``results`` keys follow :data:`JOB_FILE`, so no key can name a path); anything else
raises :class:`~datatrace.errors.RetrainCacheError`. A result file is only read when it is a plain file (not a
link) named by the job-file rule :data:`JOB_FILE`, with ``allow_pickle=False``; one that is unreadable, truncated,
of another dtype or shape, or non-finite is logged as a warning and retrained (its replacement is written
atomically over the directory entry, so a link is replaced, never followed). Paths are only ever built from the
cache folder and job keys made by the caller, never from a file's contents, so nothing outside ``cache_dir`` is
read, written or deleted because of what the folder holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np

from datatrace.errors import RetrainCacheError, bad_value, describe
from datatrace.fileio import atomic_write

__all__ = ["FLUSH_SECONDS", "FORMAT_VERSION", "JOB_FILE", "MANIFEST", "RetrainCache"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FLUSH_SECONDS = 1.0
FIELD_MEANINGS = {
    "train_sha256": " (the training data differ: a cache never serves results of other data)",
    "indices_sha256": " (the left-out indices differ)",
    "masks_sha256": " (the subsets differ)",
    "seeds_sha256": " (the per-run seeds differ)",
    "seed_passed": " (train_fn's signature changed: it does or does not take a seed now)",
    "format": " (written by another version of datatrace)",
}
# the names of result files: ASCII digits only, matched in full (re.fullmatch: "$" would accept a trailing newline)
JOB_FILE = re.compile(r"(base|loo-[0-9]+|subset-[0-9]+-seed-[0-9]+)\.npy", re.ASCII)
SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _canonical(value: Any) -> str:
    """JSON text of a value, so that ``1``, ``1.0`` and ``true`` (equal in Python) compare as different."""
    return json.dumps(value, sort_keys=True)


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
        if os.path.lexists(manifest_path):
            stored = self._read_manifest(manifest_path)
            for field, value in wanted.items():
                if _canonical(stored.get(field, "<missing>")) != _canonical(value):
                    meaning = FIELD_MEANINGS.get(field, "")
                    raise ValueError(
                        f"cache_dir={str(self.path)!r} holds results of a different run{meaning}: its {MANIFEST} "
                        f"has {field}={stored.get(field, '<missing>')!r} but this call has {field}={value!r}. "
                        "Fix: use a new cache_dir for this configuration (or call with the original arguments to "
                        "resume that run)."
                    )
            unknown = sorted(set(stored) - set(wanted) - {"n_query", "results"})
            if unknown:
                raise self._manifest_error(f"has unknown key(s) {unknown[:3]}")
            n_query = stored.get("n_query")
            if n_query is not None and (type(n_query) is not int or n_query < 1):
                raise self._manifest_error(f"has n_query={n_query!r}, not a positive integer")
            results = stored.get("results", {})
            if not isinstance(results, dict):
                raise self._manifest_error(f"has results={describe(results)}, not an object")
            for key, digest in results.items():
                if (
                    not JOB_FILE.fullmatch(f"{key}.npy")
                    or not isinstance(digest, str)
                    or not SHA256.fullmatch(digest)
                ):
                    raise self._manifest_error(
                        f"has results entry {describe(key)}: {describe(digest)}; allowed are job keys "
                        f"({JOB_FILE.pattern} without .npy) mapped to sha256 hex digests"
                    )
            self.n_query: int | None = n_query
            self.checksums: dict[str, str] = dict(results)
            self.manifest = stored
        else:
            leftovers = sorted(p.name for p in self.path.iterdir() if JOB_FILE.fullmatch(p.name))
            if leftovers:
                raise RetrainCacheError(
                    f"cache_dir={str(self.path)!r} holds result files ({', '.join(leftovers[:3])}, ...) but no "
                    f"{MANIFEST}, so it is unknown which run they belong to. Fix: use a new cache_dir."
                )
            self.n_query = None
            self.checksums = {}
            self.manifest = wanted
            self._write_manifest()
        self._unsaved = False
        self._last_write = time.monotonic()

    def _manifest_error(self, problem: str) -> RetrainCacheError:
        return RetrainCacheError(
            f"cache_dir={str(self.path)!r}: its {MANIFEST} {problem}, so it was not written by datatrace (or was "
            "changed since). Fix: use a new cache_dir, or delete this one."
        )

    def _read_manifest(self, manifest_path: Path) -> dict[str, Any]:
        """The stored manifest: a plain file (not a link) holding a JSON object, else RetrainCacheError."""
        try:
            mode = os.lstat(manifest_path).st_mode
        except OSError as error:
            raise self._manifest_error(f"cannot be examined ({error})") from None
        if not stat.S_ISREG(mode):  # a link could point anywhere; a FIFO would block the read
            raise self._manifest_error("is not a plain file (a link, folder or device)")
        try:
            stored = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self._manifest_error(f"is unreadable ({error})") from None
        if not isinstance(stored, dict):
            raise self._manifest_error(f"holds a JSON {type(stored).__name__}, not an object")
        return stored

    def _write_manifest(self) -> None:
        manifest = {**self.manifest, "results": dict(sorted(self.checksums.items()))}
        if self.n_query is not None:
            manifest["n_query"] = self.n_query
        atomic_write(self.path / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
        self.manifest = manifest
        self._unsaved = False
        self._last_write = time.monotonic()

    def set_n_query(self, n_query: int) -> None:
        self.n_query = int(n_query)
        self._write_manifest()

    def flush(self) -> None:
        """Write the manifest if results were saved since it was last written (their digests)."""
        if self._unsaved:
            self._write_manifest()

    def _job_path(self, key: str) -> Path:
        name = f"{key}.npy"
        if not JOB_FILE.fullmatch(
            name
        ):  # keys are made by retrain.py; refuse anything that could leave the folder
            raise bad_value("key", key, f"expected a job key matching {JOB_FILE.pattern}", "pass a job key")
        return self.path / name

    def load(self, key: str) -> np.ndarray | None:
        """The cached outputs of job ``key``, or None when there are none or they cannot be trusted.

        A result is trusted only when it is a plain file holding a finite 1-D float64 array of ``n_query``
        values (the length the manifest records); anything else is logged and retrained. A folder or device
        under a result file's name cannot be replaced by the retrain, so it raises RetrainCacheError."""
        path = self._job_path(key)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            return self._ignore(path, "it is a link, and links in a cache are never followed")
        if not stat.S_ISREG(mode):
            raise RetrainCacheError(
                f"cache_dir={str(self.path)!r} holds {path.name}, which is not a plain file (a folder or device), "
                "where a result file belongs. Fix: remove it, or use a new cache_dir."
            )
        expected = self.checksums.get(key)
        if expected is None:
            return self._ignore(
                path, f"its sha256 is not recorded in {MANIFEST}: the run stopped before it was"
            )
        try:
            raw = path.read_bytes()
        except OSError as error:
            return self._ignore(path, f"unreadable: {error}")
        if hashlib.sha256(raw).hexdigest() != expected:
            return self._ignore(
                path, f"its sha256 differs from the one in {MANIFEST}: the file changed on disk"
            )
        try:
            out = np.load(io.BytesIO(raw), allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:  # an empty file raises EOFError
            return self._ignore(path, f"unreadable: {error}")
        if not isinstance(out, np.ndarray) or out.dtype != np.float64:
            return self._ignore(path, f"it holds {type(out).__name__} of dtype {getattr(out, 'dtype', None)}")
        if out.ndim != 1 or (self.n_query is not None and out.size != self.n_query):
            return self._ignore(
                path, f"it holds shape {out.shape}; the cache's runs have shape ({self.n_query},)"
            )
        if not np.isfinite(out).all():
            return self._ignore(path, "it holds non-finite values, which are never cached")
        return out

    def _ignore(self, path: Path, why: str) -> None:
        logger.warning("Ignoring cached result %s (%s); it will be retrained.", path, why)
        return None

    def save(self, key: str, outputs: np.ndarray) -> None:
        array = np.ascontiguousarray(outputs, dtype=np.float64)
        digest = atomic_write(self._job_path(key), lambda tmp: save_npy(tmp, array), checksum=True)
        self.checksums[key] = str(digest)
        self._unsaved = True
        if time.monotonic() - self._last_write >= FLUSH_SECONDS:
            self._write_manifest()


def save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array, allow_pickle=False)
