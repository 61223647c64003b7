"""An on-disk store of projected training gradients: written once and resumably, checksummed, read memory-mapped.

Projected-gradient attributors (TRAK, LoGra, :class:`~datatrace.attributors.projected.ProjectedInfluence`) compute
one feature vector ``phi_i = P^T grad l(z_i)`` (``k`` numbers) per training example *once*, and then answer every
query set with a matrix product (Park et al. 2023; Choe et al. 2024). A :class:`GradientStore` holds those
``n x k`` features on disk; it is a :class:`~datatrace.projection.features.FeatureSource`, scored by
:mod:`datatrace.projection.scoring`.

* **layout**: a directory with ``chunk-000000.npy``, ``chunk-000001.npy``, ... (``chunk_size`` rows each, the last
  one shorter) and ``manifest.json`` (shapes, dtype, the sha256 of every chunk file, and *fingerprints* of what the
  features were computed from, :mod:`datatrace.projection.fingerprint`). Optional float64 *accumulators* (sums
  over examples computed in the same pass, e.g. the projected Gauss-Newton matrix) are kept beside them in a
  safetensors file, checksummed too.
* **written once, resumably**: every chunk file is written to a temporary name, fsynced and renamed
  (``os.replace``), and only then recorded in the manifest (itself replaced atomically). An interrupted write
  therefore leaves only completed chunks that look complete; a rerun with the same fingerprints
  (:meth:`GradientStore.create` on the same directory) reuses them and computes only the missing ones. A store
  whose fingerprints differ is refused with an error that names the fingerprint that differs.
* **precision**: features can be stored as float32, float16 or bfloat16 (bfloat16 as raw 16-bit words, since
  numpy has no bfloat16); the scoring functions upcast them before every product.
* **one writer**: :meth:`GradientStore.fill` takes a lock file naming its holder; a second fill is refused with a
  :class:`~datatrace.errors.StoreLockedError`, a stale lock (its process gone, or no heartbeat for hours) is taken
  over so that a crashed run resumes (:mod:`datatrace.projection.lock`). Readers need no lock.
* **never trusted blindly** (:mod:`datatrace.projection.manifest`): the manifest is checked whole on every open
  (types, chunks covering rows ``0..n`` exactly, only the store's own plain file names), and each chunk and
  accumulator file is hashed the first time this object reads it (again only if its size, mtime or inode change;
  files this process wrote are known good; chunks read in order are hashed a few ahead, in threads), so damage is a :class:`~datatrace.errors.StoreCorruptedError` naming
  the file before any of its numbers is used, never a wrong answer or a file touched outside the store folder.
* **reading**: chunks are memory-mapped (``np.load(mmap_mode="c")``, never pickle), so a store larger than memory
  is read block by block. :meth:`GradientStore.verify` re-hashes every file, every time.

**Under torch.distributed** (a process group initialised by the caller, e.g. with ``torchrun``;
:mod:`datatrace.distributed`), :meth:`GradientStore.create` and :meth:`GradientStore.fill` are *collective*: every
rank calls them with the same arguments (or wraps a rank-0-only call in :func:`~datatrace.distributed.local_only`),
and the directory must be on a file system that every rank sees. ``create``: rank 0 creates or checks the store,
then the other ranks open it and check it against their own arguments. ``fill``: the missing chunks are dealt out
round-robin (the ``j``-th missing chunk to rank ``j % world_size``), in rounds of one chunk per rank; every rank
writes only its own chunk files (atomically, as above), and after each round rank 0 records the round's chunks and
their accumulators in the manifest (the only writer of the manifest), adding the sums in chunk order, so the store
is the same, file for file, as one written by a single process. An interruption loses at most the current round; a
rerun (with any number of ranks) computes only the missing chunks. If ``compute`` raises on one rank, the chunks
the other ranks finished in that round are still recorded and then every rank raises
(:func:`~datatrace.distributed.raise_if_any_failed`), so none waits forever (a ``KeyboardInterrupt`` or a killed
process is not caught: the others wait for the process group's timeout). Afterwards every rank reads the complete
store; as a sharded feature source, each rank scores its own contiguous range of chunks.

Example:
    >>> import tempfile, torch
    >>> from datatrace.projection.store import GradientStore
    >>> features = torch.randn(10, 4)
    >>> store = GradientStore.create(tempfile.mkdtemp(), n=10, dim=4, chunk_size=4, fingerprints={"model": "m1"})
    >>> store = store.fill(lambda start, stop: features[start:stop], progress=False)
    >>> store.complete, store.n_chunks
    (True, 3)
    >>> torch.equal(store.to_tensor(), features)
    True
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from datatrace.distributed import all_gather_rows, is_main_process, raise_if_any_failed, world
from datatrace.errors import (
    StoreCorruptedError,
    StoreLockedError,
    StoreMismatchError,
    bad_value,
    check_positive_int,
)
from datatrace.fileio import atomic_write
from datatrace.projection.chunks import (
    STORAGE_DTYPES,
    Layout,
    accumulator_layout,
    add_accumulators,
    check_chunk_features,
    chunk_file_name,
    decode_reports,
    dtype_name,
    encode_report,
    read_chunk_file,
    write_chunk_file,
)
from datatrace.projection.features import FeatureBlock, FeatureSource, read_ahead
from datatrace.projection.fingerprint import canonical_json
from datatrace.projection.lock import STALE_SECONDS, StoreLock
from datatrace.projection.manifest import (
    MANIFEST,
    check_files_exist,
    check_same,
    checked_file,
    mark_verified,
    new_manifest,
    read_manifest,
    store_file,
    verify_files,
)

logger = logging.getLogger(__name__)

#: default chunk: about this many bytes of features per file
DEFAULT_CHUNK_BYTES = 64 * 1024**2
#: chunks opened (and checksummed) ahead, in parallel, while a store is read in order
READ_AHEAD = max(1, min(4, os.cpu_count() or 1))


class GradientStore(FeatureSource):
    """Projected per-example training gradients on disk: chunked ``.npy`` files plus a JSON manifest.

    Open an existing store with ``GradientStore(directory)``; create one (or resume an interrupted one) with
    :meth:`create`, then :meth:`fill` it (or :meth:`write_chunk` chunk by chunk).

    Attributes (from the manifest): ``n`` (rows), ``dim`` (features per row), ``dtype`` (storage dtype),
    ``chunk_size``, ``n_chunks``, ``fingerprints``, ``complete``.

    As a :class:`~datatrace.projection.features.FeatureSource` (``chunk_rows`` = ``chunk_size``, :meth:`blocks`) it
    needs to be complete, and it is sharded: under torch.distributed each rank reads its own range of chunks.
    """

    sharded = True
    #: a fill lock whose heartbeat is older than this (seconds) is stale and taken over (datatrace.projection.lock)
    lock_stale_seconds: float = STALE_SECONDS

    def __init__(self, directory: str | os.PathLike) -> None:
        try:
            self.path = Path(directory)
        except TypeError:
            raise bad_value("directory", directory, "expected a path", "pass a directory path") from None
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(
                f"directory={str(self.path)!r} holds no {MANIFEST}, so it is not a GradientStore. Fix: pass the "
                "directory a store was written to, or create one with GradientStore.create(...)."
            )
        self._manifest = read_manifest(manifest_path)
        self._accumulators: dict[str, torch.Tensor] | None = None
        #: (file name, sha256) -> (size, mtime_ns, inode) of the files whose digest this object checked or wrote
        self._verified: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._lock: StoreLock | None = None

    # -- creation --------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        *,
        n: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        fingerprints: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_multiple: int = 1,
    ) -> GradientStore:
        """A new store in ``directory``, or the existing one there if it was made for the same thing.

        Under ``torch.distributed`` this is collective: rank 0 creates (or checks) the store first, then the other
        ranks open the manifest rank 0 wrote and check it against their own arguments; if any rank fails, every
        rank raises. ``directory`` must therefore be on a file system that every rank sees.

        The existing store (complete or interrupted) is reused when its ``n``, ``dim``, ``dtype``, ``chunk_size`` and
        every fingerprint equal the ones given here; otherwise a :class:`StoreMismatchError` names what differs.

        Args:
            directory: where the store lives (created if needed).
            n: number of rows (training examples). dim: features per row.
            dtype: storage dtype, float32 (default), float16, bfloat16 or float64.
            chunk_size: rows per chunk file (default: about 64 MiB per file, and at most ``ceil(n / world_size)``
                rows under torch.distributed so that every rank writes a share, rounded up to a multiple of
                ``chunk_multiple``).
            fingerprints: JSON values identifying what the features are computed from, e.g.
                ``{"model": sha256, "data": sha256, "projection": {...}}``.
            metadata: free JSON facts recorded in the manifest (not compared).
            chunk_multiple: the default ``chunk_size`` is a multiple of it (e.g. the batch size, so that chunks
                start where a single process's batches start); ignored when ``chunk_size`` is given or the store
                exists.
        """
        for name, value in (("fingerprints", fingerprints), ("metadata", metadata)):
            if value is not None and not isinstance(value, Mapping):
                raise bad_value(
                    name,
                    value,
                    "expected a dict of JSON values or None",
                    f"pass e.g. {name}={{'model': 'v1'}}",
                )
        kwargs = {
            "n": n,
            "dim": dim,
            "dtype": dtype,
            "chunk_size": chunk_size,
            "chunk_multiple": check_positive_int("chunk_multiple", chunk_multiple),
            "fingerprints": fingerprints,
            "metadata": metadata,
        }
        rank, _, distributed = world()
        if not distributed:
            return cls._create_here(directory, **kwargs)
        what = f"GradientStore.create({str(directory)!r})"
        store: GradientStore | None = None
        error: BaseException | None = None
        if rank == 0:
            try:
                store = cls._create_here(directory, **kwargs)
            except Exception as err:
                error = err
        raise_if_any_failed(error, what)
        if rank != 0:
            try:
                if not (Path(directory) / MANIFEST).exists():
                    raise FileNotFoundError(
                        f"directory={str(directory)!r}: rank 0 created the GradientStore there, but rank {rank} "
                        f"finds no {MANIFEST}. Under torch.distributed the store must be on a file system that every "
                        "rank sees. Fix: pass a directory on a shared file system (or run without a process group)."
                    )
                store = cls._create_here(directory, **kwargs)
            except Exception as err:
                error = err
        raise_if_any_failed(error, what)
        if store is None:  # pragma: no cover - an invariant of the code above
            raise RuntimeError("internal error: store is missing")
        return store

    @classmethod
    def _create_here(
        cls,
        directory: str | os.PathLike,
        *,
        n: int,
        dim: int,
        dtype: torch.dtype,
        chunk_size: int | None,
        fingerprints: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        chunk_multiple: int = 1,
    ) -> GradientStore:
        """:meth:`create` in this process only (no collective)."""
        n = check_positive_int("n", n)
        dim = check_positive_int("dim", dim)
        name = dtype_name(dtype)
        itemsize = STORAGE_DTYPES[name][1].itemsize
        fingerprints = canonical_json(dict(fingerprints or {}))
        try:
            path = Path(directory)
        except TypeError:
            raise bad_value("directory", directory, "expected a path", "pass a directory path") from None
        if chunk_size is None:
            if (
                path / MANIFEST
            ).exists():  # resuming or reusing: keep the chunking the store was written with
                chunk_size = int(cls(path)._manifest.get("chunk_size", 0)) or None
            if chunk_size is None:
                # at most 64 MiB per chunk, and at least one chunk per rank so that every rank has work
                per_rank = -(-n // world()[1])
                chunk_size = max(1, min(per_rank, DEFAULT_CHUNK_BYTES // (dim * itemsize)))
                chunk_size = min(n, -(-chunk_size // chunk_multiple) * chunk_multiple)
        chunk_size = check_positive_int("chunk_size", chunk_size)
        if path.exists() and not path.is_dir():
            raise bad_value(
                "directory", str(path), "the path exists and is not a directory", "pass a directory"
            )
        path.mkdir(parents=True, exist_ok=True)
        if (path / MANIFEST).exists():
            store = cls(path)
            settings = {"n": n, "dim": dim, "dtype": name, "chunk_size": chunk_size}
            check_same(path, store._manifest, settings, fingerprints)
            check_files_exist(path, store._manifest)
            if is_main_process():  # rank 0 says it for all
                done = f"complete ({store.n_chunks} chunks); reusing it"
                if not store.complete:
                    done = f"resuming an interrupted write, {len(store._manifest['chunks'])} of {store.n_chunks} done"
                logger.info("GradientStore %s is %s.", path, done)
            return store
        leftovers = sorted(p.name for p in path.iterdir() if p.name.startswith("chunk-"))
        if leftovers:
            raise ValueError(
                f"directory={str(path)!r} holds chunk files ({', '.join(leftovers[:3])}, ...) but no {MANIFEST}, "
                "so it is unknown what they were computed from. Fix: use a new directory or empty this one."
            )
        store = cls.__new__(cls)
        store.path = path
        store._manifest = new_manifest(
            n, dim, name, chunk_size, fingerprints, canonical_json(dict(metadata or {}))
        )
        store._accumulators = None
        store._verified = {}
        store._lock = None
        store._write_manifest()
        return store

    # -- properties ------------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self._manifest["n"])

    def __len__(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self._manifest["dtype"]][0]

    @property
    def chunk_size(self) -> int:
        return int(self._manifest["chunk_size"])

    @property
    def chunk_rows(self) -> int:
        return self.chunk_size

    @property
    def n_chunks(self) -> int:
        return int(self._manifest["n_chunks"])

    @property
    def fingerprints(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest["fingerprints"]))

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest.get("metadata", {})))

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def nbytes(self) -> int:
        """Bytes of features on disk (without the .npy headers and accumulators)."""
        return self.n * self.dim * STORAGE_DTYPES[self._manifest["dtype"]][1].itemsize

    def rows(self, chunk: int) -> tuple[int, int]:
        """``(start, stop)`` rows of chunk ``chunk``."""
        self._check_chunk_index(chunk)
        start = chunk * self.chunk_size
        return start, min(self.n, start + self.chunk_size)

    def missing_chunks(self) -> list[int]:
        """Indices of the chunks not written yet."""
        done = self._manifest["chunks"]
        return [i for i in range(self.n_chunks) if str(i) not in done]

    def __repr__(self) -> str:
        state = (
            "complete"
            if self.complete
            else f"{self.n_chunks - len(self.missing_chunks())}/{self.n_chunks} chunks"
        )
        return f"GradientStore({str(self.path)!r}, n={self.n}, dim={self.dim}, dtype={self._manifest['dtype']}, {state})"

    def _check_chunk_index(self, chunk: Any) -> int:
        if (
            isinstance(chunk, bool)
            or not isinstance(chunk, (int, np.integer))
            or not 0 <= chunk < self.n_chunks
        ):
            raise IndexError(
                f"chunk={chunk!r} is out of range: this store has {self.n_chunks} chunks, allowed is "
                f"0 <= chunk < {self.n_chunks}. Fix: pass a chunk index in that range."
            )
        return int(chunk)

    # -- writing ---------------------------------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        text = json.dumps(self._manifest, indent=1, sort_keys=True)
        atomic_write(self.path / MANIFEST, lambda tmp: Path(tmp).write_text(text))

    def write_chunk(
        self, chunk: int, features: torch.Tensor, accumulators: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Write chunk ``chunk`` (its ``(rows, dim)`` features) and add ``accumulators`` to the running sums.

        The chunk file and the new sums are written atomically and then recorded in the manifest in one atomic
        replace, so an interruption at any point leaves a store whose recorded chunks and sums agree. This process
        only (no collective): under ``torch.distributed`` use :meth:`fill`, which lets rank 0 alone write the
        manifest. Outside :meth:`fill` it takes the fill lock for the write and reads the manifest again under it.
        """
        chunk = self._check_chunk_index(chunk)
        with self._filling():
            if str(chunk) in self._manifest["chunks"]:
                raise ValueError(
                    f"chunk {chunk} of the GradientStore in {str(self.path)!r} is already written; a store is "
                    "written once. Fix: write only missing_chunks(), or use a new directory."
                )
            entry = self._write_chunk_file(chunk, features)
            self._record([(chunk, entry, accumulators)])

    def _write_chunk_file(self, chunk: int, features: torch.Tensor) -> dict[str, Any]:
        """Check ``features`` and write them atomically to the chunk's file; return its manifest entry."""
        start, stop = self.rows(chunk)
        features = check_chunk_features(features, chunk, start, stop, self.dim)
        name = chunk_file_name(chunk)
        digest = write_chunk_file(self.path / name, chunk, features, self._manifest["dtype"])
        mark_verified(self.path, name, digest, self._verified)
        return {"file": name, "rows": stop - start, "sha256": digest}

    def _record(
        self, written: Sequence[tuple[int, dict[str, Any], Mapping[str, torch.Tensor] | None]]
    ) -> None:
        """Add written chunks ``(chunk, entry, accumulators)`` to the manifest, in the order given: the sums are
        added in that order, saved to a new accumulator file, and the manifest is replaced once."""
        if not written:
            return
        old_acc_file = None
        running: dict[str, torch.Tensor] | None = None
        for _chunk, _, accumulators in written:
            if not accumulators:
                continue
            if running is None:
                running = self._load_accumulators()
            add_accumulators(running, accumulators)
        if running is not None:
            last = written[-1][0]
            acc_name = f"accumulators-{last:06d}-{secrets.token_hex(4)}.safetensors"
            sums = running
            acc_digest = atomic_write(
                self.path / acc_name,
                lambda tmp: save_file({k: v.contiguous() for k, v in sums.items()}, tmp),
                checksum=True,
            )
            if acc_digest is None:  # pragma: no cover - atomic_write returns it with checksum=True
                raise RuntimeError("internal error: digest is missing")
            mark_verified(self.path, acc_name, acc_digest, self._verified)
            old = self._manifest.get("accumulators")
            old_acc_file = old["file"] if old else None
            self._manifest["accumulators"] = {
                "file": acc_name,
                "sha256": acc_digest,
                "names": sorted(running),
            }
            self._accumulators = running
        for chunk, entry, _ in written:
            self._manifest["chunks"][str(chunk)] = dict(entry)
        self._manifest["complete"] = len(self._manifest["chunks"]) == self.n_chunks
        self._write_manifest()
        if old_acc_file is not None:
            try:
                os.remove(store_file(self.path, old_acc_file))
            except OSError:
                pass

    def _reload(self) -> None:
        """Read the manifest again from disk (after another rank or process wrote it); the accumulators in memory
        are kept if the manifest still records the same file, and so are the digests already checked."""
        fresh = type(self)(self.path)
        if fresh._manifest["accumulators"] != self._manifest["accumulators"]:
            self._accumulators = None
        self._manifest = fresh._manifest

    @contextmanager
    def _filling(self) -> Iterator[None]:
        """Hold the fill lock (module docstring; nothing to do if this object holds it already) and read the
        manifest again under it, since another process may have written chunks before the lock was ours."""
        if self._lock is not None:
            yield
            return
        self._lock = StoreLock(self.path, self.lock_stale_seconds).acquire()
        try:
            self._reload()
            yield
        finally:
            self._lock.release()
            self._lock = None

    def fill(
        self,
        compute: Callable[[int, int], torch.Tensor | tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
        progress: bool = True,
    ) -> GradientStore:
        """Compute and write every missing chunk: ``compute(start, stop)`` returns the rows ``start:stop`` (and
        optionally a dict of float64 accumulators to add to the running sums). Returns ``self``, complete.

        Completed chunks are never recomputed, so calling ``fill`` again after an interruption resumes. An
        incomplete store is filled under its lock (module docstring): if another process is filling it, a
        :class:`~datatrace.errors.StoreLockedError` names that process; a stale lock is taken over.

        Under ``torch.distributed`` this is collective (module docstring): the missing chunks are dealt out
        round-robin over the ranks, each rank computes and writes only its own, rank 0 records them in the
        manifest after every round, and every rank returns the complete store. ``compute`` is called only for
        this rank's chunks.
        """
        rank, size, distributed = world()
        if distributed:
            return self._fill_distributed(compute, progress, rank, size)
        if self.complete:
            return self
        with self._filling():
            missing = self.missing_chunks()
            self._fill_chunks(compute, progress, missing)
        return self

    def _fill_chunks(self, compute: Callable[[int, int], Any], progress: bool, missing: list[int]) -> None:
        """Compute and write the ``missing`` chunks in this process, holding the lock."""
        done_rows = self.n - sum(self._rows_of(i) for i in missing)
        with tqdm(
            total=self.n, initial=done_rows, desc="gradient store", disable=not progress, leave=False
        ) as bar:
            for chunk in missing:
                start, stop = self.rows(chunk)
                try:
                    out = compute(start, stop)
                except BaseException:
                    logger.warning(
                        "GradientStore %s: stopped in chunk %d; %d of %d chunks are written and will be reused. "
                        "Call again with the same arguments to resume.",
                        self.path,
                        chunk,
                        self.n_chunks - len(self.missing_chunks()),
                        self.n_chunks,
                    )
                    raise
                features, acc = out if isinstance(out, tuple) else (out, None)
                self.write_chunk(chunk, features, acc)
                if self._lock is not None:
                    self._lock.heartbeat()
                bar.update(stop - start)

    # -- writing under torch.distributed ---------------------------------------------------------------------------
    def _fill_distributed(
        self, compute: Callable[[int, int], Any], progress: bool, rank: int, size: int
    ) -> GradientStore:
        # The store has one writer whatever the number of ranks: rank 0 takes the fill lock (and reads the
        # manifest again under it); if it cannot, every rank raises.
        held, error = ExitStack(), None
        if rank == 0 and not self.complete:  # a complete store is read, not written: no lock
            try:
                held.enter_context(self._filling())
            except Exception as err:
                error = err
        raise_if_any_failed(error, f"the fill lock of the GradientStore {self.path}")
        with held:
            return self._fill_rounds(compute, progress, rank, size)

    def _fill_rounds(
        self, compute: Callable[[int, int], Any], progress: bool, rank: int, size: int
    ) -> GradientStore:
        """:meth:`fill` under torch.distributed, rank 0 holding the lock (module docstring)."""
        # Rank 0's manifest is the plan: every rank takes its list of missing chunks (one small gather).
        mask = None
        if rank == 0:
            mask = torch.zeros(self.n_chunks, dtype=torch.long)
            mask[self.missing_chunks()] = 1
        gathered = all_gather_rows(mask)
        if gathered is None:  # pragma: no cover - rank 0 always contributes
            raise RuntimeError("internal error: gathered is missing")
        missing = gathered.nonzero().flatten().tolist()
        if not missing:
            if rank != 0:
                self._reload()
            return self
        done_rows = self.n - sum(self._rows_of(i) for i in missing)
        layout: Layout | None = None  # names and shapes of the accumulators
        with tqdm(
            total=self.n,
            initial=done_rows,
            desc="gradient store",
            disable=not progress or rank != 0,
            leave=False,
        ) as bar:
            for first in range(0, len(missing), size):
                round_chunks = missing[first : first + size]
                mine = round_chunks[rank] if rank < len(round_chunks) else None
                row: torch.Tensor | None = None
                error: BaseException | None = None
                if mine is not None:
                    try:
                        start, stop = self.rows(mine)
                        out = compute(start, stop)
                        features, acc = out if isinstance(out, tuple) else (out, None)
                        entry = self._write_chunk_file(mine, features)
                        acc_layout, row = encode_report(mine, entry["sha256"], acc)
                        layout = layout or acc_layout
                    except Exception as err:
                        logger.error(
                            "GradientStore %s: rank %d failed in chunk %d: %s", self.path, rank, mine, err
                        )
                        error = err
                # the chunks written this round (a failed rank contributes none); rank 0 records them
                rows = all_gather_rows(row)
                if rank == 0 and rows is not None:
                    try:
                        layout = layout or accumulator_layout(self._load_accumulators())
                        self._record(self._decode_round(rows, layout))
                        if self._lock is not None:
                            self._lock.heartbeat()
                        bar.update(sum(self._rows_of(int(r[0])) for r in rows))
                    except Exception as err:
                        logger.error("GradientStore %s: rank 0 failed to record chunks: %s", self.path, err)
                        error = error or err
                try:
                    raise_if_any_failed(error, f"the chunks {round_chunks} of the GradientStore {self.path}")
                except BaseException:
                    if rank == 0:
                        self._reload()
                        logger.warning(
                            "GradientStore %s: stopped in chunks %s; %d of %d chunks are written and will be "
                            "reused. Call again with the same arguments (any number of ranks) to resume.",
                            self.path,
                            round_chunks,
                            self.n_chunks - len(self.missing_chunks()),
                            self.n_chunks,
                        )
                    raise
        if rank != 0:
            self._reload()  # rank 0 wrote the manifest before the last raise_if_any_failed (a barrier)
        return self

    def _rows_of(self, chunk: int) -> int:
        start, stop = self.rows(chunk)
        return stop - start

    def _decode_round(
        self, rows: torch.Tensor, layout: Layout | None
    ) -> list[tuple[int, dict[str, Any], dict[str, torch.Tensor] | None]]:
        """The ``(chunk, entry, accumulators)`` of every gathered row, in chunk order."""
        return [
            (chunk, {"file": chunk_file_name(chunk), "rows": self._rows_of(chunk), "sha256": sha}, acc)
            for chunk, sha, acc in decode_reports(rows, layout)
        ]

    # -- reading ---------------------------------------------------------------------------------------------------
    def _require_complete(self) -> None:
        if not self.complete:
            missing = self.missing_chunks()
            raise RuntimeError(
                f"the GradientStore in {str(self.path)!r} is incomplete: {len(missing)} of {self.n_chunks} chunks are "
                f"missing (first: {missing[:5]}), because its write was interrupted. Fix: run the same computation "
                "again (e.g. fit with the same store_dir) to resume it."
            )

    def chunk(self, chunk: int) -> torch.Tensor:
        """The features of chunk ``chunk`` as a tensor backed by a copy-on-write memory map (stored dtype)."""
        chunk = self._check_chunk_index(chunk)
        entry = self._manifest["chunks"].get(str(chunk))
        if entry is None:
            raise RuntimeError(
                f"chunk {chunk} of the GradientStore in {str(self.path)!r} is not written yet. Fix: fill the store."
            )
        path = checked_file(self.path, f"chunk {chunk}", entry, self._verified)
        return read_chunk_file(path, entry["rows"], self.dim, self._manifest["dtype"])

    def features(self, chunks: int | Sequence[int] | None = None) -> Iterator[FeatureBlock]:
        """Iterate over :class:`FeatureBlock` s (``chunk``, ``start``, ``values``) of the given chunks (default all)."""
        if chunks is None:
            self._require_complete()
            order: Sequence[int] = range(self.n_chunks)
        elif isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
            order = [int(chunks)]
        else:
            order = list(chunks)
        # the next chunks are opened (and hashed, the first time) ahead in threads; each is checked before use
        for i, values in read_ahead([self._check_chunk_index(i) for i in order], self.chunk, READ_AHEAD):
            yield FeatureBlock(i, self.rows(i)[0], values)

    def blocks(self, chunks: Sequence[int] | None = None) -> Iterator[FeatureBlock]:
        """The :class:`FeatureBlock` s of ``chunks`` (default all) of a complete store."""
        self._require_complete()
        yield from self.features(range(self.n_chunks) if chunks is None else chunks)

    def to_tensor(self) -> torch.Tensor:
        """All ``(n, dim)`` features in memory (stored dtype). For small stores and tests."""
        return torch.cat([block.values for block in self.features()])

    def _load_accumulators(self) -> dict[str, torch.Tensor]:
        if self._accumulators is None:
            entry = self._manifest.get("accumulators")
            if not entry:
                self._accumulators = {}
            else:
                path = checked_file(self.path, "the accumulators", entry, self._verified)
                try:
                    self._accumulators = dict(load_file(str(path)))
                except Exception as err:  # safetensors raises its own error types
                    raise StoreCorruptedError(
                        f"accumulator file {path} cannot be read ({err}). Fix: delete the store and compute it again."
                    ) from None
        return {k: v.clone() for k, v in self._accumulators.items()}

    def accumulator(self, name: str) -> torch.Tensor:
        """The float64 sum ``name`` accumulated over every chunk (needs a complete store)."""
        self._require_complete()
        acc = self._load_accumulators()
        if name not in acc:
            raise bad_value(
                "name", name, f"this store holds accumulators {sorted(acc)}", "pass one of those names"
            )
        return acc[name]

    def verify(self) -> GradientStore:
        """Re-hash every chunk file and the accumulators against the manifest; raise :class:`StoreCorruptedError`
        naming every file that is missing or altered. Returns ``self`` when all is well."""
        verify_files(self.path, self._manifest)
        return self


__all__ = ["GradientStore", "StoreCorruptedError", "StoreLockedError", "StoreMismatchError", "dtype_name"]
