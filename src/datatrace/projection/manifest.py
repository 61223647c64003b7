"""A GradientStore's manifest: read, checked whole on every open, and the only file names it may record.

The manifest (``manifest.json``) is the store's single source of truth: which chunks are written, their sizes and
sha256 digests, the accumulator file, and what the features were computed from. Everything read from it is
checked before it is used, because a damaged or hand-edited manifest must never turn into a silent wrong answer:

* **shape invariants**: ``n``, ``dim``, ``chunk_size`` are positive integers, ``dtype`` a storage dtype, and
  ``n_chunks = ceil(n / chunk_size)``, so the chunks cover rows ``0..n`` exactly, each chunk ``c`` holding rows
  ``c * chunk_size`` to ``min(n, (c + 1) * chunk_size)``; every recorded chunk has exactly that many rows;
  ``complete`` is true exactly when every chunk is recorded. (A manifest whose chunks did not cover ``n`` would
  leave unwritten columns in a score matrix.)
* **file names**: a chunk may only be called :func:`~datatrace.projection.chunks.chunk_file_name` of its index and
  the accumulators ``accumulators-<6 digits>-<8 hex>.safetensors``; with :func:`store_file` every path is checked
  to resolve to a plain file inside the store folder before any read, write or delete, so a tampered manifest
  cannot make the store read, overwrite or delete a file elsewhere (``../model.safetensors``, ``/etc/passwd``).
* **types**: every field has its JSON type; digests are 64 lowercase hex characters.

Any violation is a :class:`~datatrace.errors.StoreCorruptedError` that names the manifest, the field and the fix;
a manifest written by another store format version is a ValueError saying so.

The files the manifest records are checked too: on every reuse that they exist (:func:`check_files_exist`, one
``stat`` each), and before their numbers are first used that their sha256 is the recorded one
(:func:`checked_file`). A digest once checked is remembered, keyed by the file's size, modification time and
inode, so reading a store again in the same process does not hash it again, while a file replaced meanwhile is.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datatrace.errors import StoreCorruptedError, StoreMismatchError
from datatrace.fileio import sha256_file
from datatrace.projection.chunks import STORAGE_DTYPES, chunk_file_name
from datatrace.projection.fingerprint import SCHEME_DIFFERS, fingerprint_difference

__all__ = [
    "ACCUMULATOR_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "check_files_exist",
    "check_manifest",
    "check_same",
    "checked_file",
    "mark_verified",
    "new_manifest",
    "read_manifest",
    "recorded_files",
    "store_file",
    "verify_files",
]

FORMAT = "datatrace.GradientStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the only names an accumulator file may have (written by GradientStore._record)
ACCUMULATOR_FILE = re.compile(r"accumulators-[0-9]{6}-[0-9a-f]{8}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEYS = (
    "format",
    "version",
    "n",
    "dim",
    "dtype",
    "chunk_size",
    "n_chunks",
    "fingerprints",
    "metadata",
    "chunks",
    "accumulators",
    "complete",
)


def _damaged(manifest_path: Path, problem: str) -> StoreCorruptedError:
    return StoreCorruptedError(
        f"{manifest_path} is damaged: {problem}. A GradientStore is never read from a manifest it cannot trust. "
        f"Fix: delete the directory {str(manifest_path.parent)!r} and compute the store again (or restore "
        f"{MANIFEST} from a copy)."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    """The checked manifest at ``manifest_path`` (:func:`check_manifest`); a StoreCorruptedError naming the file
    when it cannot be read, is not JSON or breaks an invariant."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _damaged(manifest_path, f"it cannot be read as JSON ({err})") from None
    check_manifest(manifest, manifest_path)
    return manifest


def check_manifest(manifest: Any, manifest_path: Path) -> None:
    """Raise a StoreCorruptedError naming ``manifest_path`` and the field unless ``manifest`` (parsed JSON) is a
    well-formed GradientStore manifest (module docstring); a ValueError if it is of another format version."""
    if not isinstance(manifest, dict):
        raise _damaged(manifest_path, f"it holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise _damaged(
            manifest_path,
            f"format={manifest.get('format', '<missing>')!r}, but a GradientStore manifest has format={FORMAT!r}",
        )
    version = manifest.get("version")
    if not _is_int(version):
        raise _damaged(manifest_path, f"version={version!r} is not an integer")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} was written by store format version {version}; this datatrace reads version "
            f"{FORMAT_VERSION}. Fix: compute the store again with this version (in a new directory)."
        )
    missing = [key for key in _KEYS if key not in manifest]
    if missing:
        raise _damaged(manifest_path, f"it lacks the field(s) {missing}")
    for key in ("n", "dim", "chunk_size"):
        if not _is_int(manifest[key]) or manifest[key] < 1:
            raise _damaged(manifest_path, f"{key}={manifest[key]!r} is not a positive integer")
    n, chunk_size = manifest["n"], manifest["chunk_size"]
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise _damaged(manifest_path, f"dtype={manifest['dtype']!r} is not one of {list(STORAGE_DTYPES)}")
    n_chunks = -(-n // chunk_size)
    if manifest["n_chunks"] != n_chunks or not _is_int(manifest["n_chunks"]):
        raise _damaged(
            manifest_path,
            f"n_chunks={manifest['n_chunks']!r}, but chunks of {chunk_size} rows cover n={n} rows in exactly "
            f"{n_chunks} chunks",
        )
    for key in ("fingerprints", "metadata"):
        if not isinstance(manifest[key], dict):
            raise _damaged(manifest_path, f"{key} is a {type(manifest[key]).__name__}, not an object")
    chunks = manifest["chunks"]
    if not isinstance(chunks, dict):
        raise _damaged(manifest_path, f"chunks is a {type(chunks).__name__}, not an object")
    for key, entry in chunks.items():
        _check_chunk_entry(manifest_path, key, entry, n, chunk_size, n_chunks)
    _check_accumulators(manifest_path, manifest["accumulators"])
    complete = manifest["complete"]
    if not isinstance(complete, bool) or complete != (len(chunks) == n_chunks):
        raise _damaged(
            manifest_path,
            f"complete={complete!r}, but {len(chunks)} of its {n_chunks} chunks are recorded",
        )


def _check_chunk_entry(
    manifest_path: Path, key: str, entry: Any, n: int, chunk_size: int, n_chunks: int
) -> None:
    if not (key.isdigit() and key == str(int(key)) and int(key) < n_chunks):
        raise _damaged(manifest_path, f"chunks has the key {key!r}; chunks are numbered 0 to {n_chunks - 1}")
    chunk = int(key)
    if not isinstance(entry, dict) or sorted(entry) != ["file", "rows", "sha256"]:
        raise _damaged(
            manifest_path, f"chunks[{key!r}]={entry!r} is not an object with file, rows and sha256"
        )
    if entry["file"] != chunk_file_name(chunk):
        raise _damaged(
            manifest_path,
            f"chunks[{key!r}].file={entry['file']!r}, but chunk {chunk} may only be the file "
            f"{chunk_file_name(chunk)!r} in the store folder",
        )
    rows = min(n, (chunk + 1) * chunk_size) - chunk * chunk_size
    if entry["rows"] != rows or not _is_int(entry["rows"]):
        raise _damaged(
            manifest_path, f"chunks[{key!r}].rows={entry['rows']!r}, but chunk {chunk} holds {rows} rows"
        )
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        raise _damaged(manifest_path, f"chunks[{key!r}].sha256={entry['sha256']!r} is not a sha256 digest")


def _check_accumulators(manifest_path: Path, entry: Any) -> None:
    if entry is None:
        return
    if not isinstance(entry, dict) or sorted(entry) != ["file", "names", "sha256"]:
        raise _damaged(
            manifest_path, f"accumulators={entry!r} is not null or an object with file, names, sha256"
        )
    if not isinstance(entry["file"], str) or not ACCUMULATOR_FILE.fullmatch(entry["file"]):
        raise _damaged(
            manifest_path,
            f"accumulators.file={entry['file']!r} is not the name of an accumulator file in the store folder "
            f"(allowed: {ACCUMULATOR_FILE.pattern})",
        )
    if not isinstance(entry["sha256"], str) or not _SHA256.fullmatch(entry["sha256"]):
        raise _damaged(manifest_path, f"accumulators.sha256={entry['sha256']!r} is not a sha256 digest")
    names = entry["names"]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise _damaged(manifest_path, f"accumulators.names={names!r} is not a list of names")


def new_manifest(
    n: int, dim: int, dtype: str, chunk_size: int, fingerprints: dict[str, Any], metadata: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of a new, empty store (no chunk written yet)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "n": n,
        "dim": dim,
        "dtype": dtype,
        "chunk_size": chunk_size,
        "n_chunks": -(-n // chunk_size),
        "fingerprints": fingerprints,
        "metadata": metadata,
        "chunks": {},
        "accumulators": None,
        "complete": False,
    }


def check_same(
    directory: Path, manifest: Mapping[str, Any], settings: Mapping[str, Any], fingerprints: Mapping[str, Any]
) -> None:
    """A StoreMismatchError naming what differs unless the store in ``directory`` was made with these
    ``settings`` (``n``, ``dim``, ``dtype`` name, ``chunk_size``) and ``fingerprints`` (so that its features may be
    reused or completed)."""
    for key, fresh in settings.items():
        if manifest[key] != fresh:
            raise StoreMismatchError(
                f"the GradientStore in {str(directory)!r} was written with {key}={manifest[key]!r} but this call "
                f"has {key}={fresh!r}. Fix: use a new directory for these settings (or delete this one), or "
                f"call with {key}={manifest[key]!r} to reuse it."
            )
    difference = fingerprint_difference(manifest["fingerprints"], fingerprints)
    if difference is not None:
        key, text = difference
        reuse = "" if text.startswith(SCHEME_DIFFERS) else f", or pass the original {key} to reuse it"
        raise StoreMismatchError(
            f"the GradientStore in {str(directory)!r} was {text}; features of different origins must never be "
            f"mixed. Fix: use a new directory (store_dir=...) for this one, or delete the old store{reuse}."
        )


def store_file(directory: Path, name: Any) -> Path:
    """``directory / name`` after checking that ``name`` is a plain file name that resolves inside ``directory``
    (no separator, not ``.`` or ``..``, not absolute, not a link that leads out); a StoreCorruptedError before
    anything is read, written or deleted otherwise."""
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
    )
    path = directory / name if plain else None
    if path is None or path.resolve().parent != directory.resolve():
        raise StoreCorruptedError(
            f"the GradientStore in {str(directory)!r} names the file {name!r}, which is not a plain file inside the "
            "store folder; it is neither read, written nor deleted. Fix: delete the store and compute it again "
            f"(its {MANIFEST} was edited or damaged, or a file of the store is a link that leads outside it)."
        )
    return path


# -- the files the manifest records --------------------------------------------------------------------------------

#: (file name, sha256) -> (size, mtime_ns, inode) of the files whose digest was checked (or written) here
Verified = dict[tuple[str, str], tuple[int, int, int]]


def recorded_files(manifest: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(what, entry)`` of every file a checked manifest records: the chunks in order, then the accumulators."""
    chunks = sorted(manifest["chunks"].items(), key=lambda kv: int(kv[0]))
    entries = [(f"chunk {k}", v) for k, v in chunks]
    if manifest["accumulators"]:
        entries.append(("the accumulators", manifest["accumulators"]))
    return entries


def check_files_exist(directory: Path, manifest: Mapping[str, Any]) -> None:
    """A StoreCorruptedError naming the recorded files that are gone (one ``stat`` each)."""
    gone = [e["file"] for _, e in recorded_files(manifest) if not store_file(directory, e["file"]).is_file()]
    if gone:
        raise StoreCorruptedError(
            f"the GradientStore in {str(directory)!r} is damaged: {len(gone)} file(s) its {MANIFEST} records are "
            f"missing ({', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}). Fix: delete the store and compute "
            "it again (or restore the files from a copy)."
        )


def _state(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def checked_file(directory: Path, what: str, entry: Mapping[str, Any], verified: Verified) -> Path:
    """The path of the recorded file ``entry`` (``file``, ``sha256``) after checking that it is inside the store
    (:func:`store_file`) and that its sha256 is the recorded one; ``verified`` remembers the digests checked, so a
    file is hashed again only if its size, modification time or inode changed. A StoreCorruptedError naming the
    file (``what``: e.g. "chunk 3") otherwise."""
    path = store_file(directory, entry["file"])
    try:
        state = _state(path)
    except FileNotFoundError:
        raise StoreCorruptedError(
            f"{what} of the GradientStore in {str(directory)!r}: {entry['file']} is missing. Fix: delete the store "
            "and compute it again (or restore the file from a copy)."
        ) from None
    key = (entry["file"], entry["sha256"])
    if verified.get(key) != state:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise StoreCorruptedError(
                f"{what} of the GradientStore in {str(directory)!r}: {entry['file']} has sha256 {digest[:12]}... but "
                f"the manifest records {entry['sha256'][:12]}...: the file was altered or damaged after it was "
                "written, so its numbers are not used. Fix: delete the store and compute it again (or restore the "
                "file from a copy); store.verify() lists every damaged file."
            )
        verified[key] = state
    return path


def mark_verified(directory: Path, name: str, digest: str, verified: Verified) -> None:
    """Remember that the file ``name`` was just written here with sha256 ``digest`` (no need to hash it again)."""
    verified[(name, digest)] = _state(store_file(directory, name))


def verify_files(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Hash every recorded file again; a StoreCorruptedError naming every file that is missing or altered."""
    problems = []
    for what, entry in recorded_files(manifest):
        path = store_file(directory, entry["file"])
        if not path.exists():
            problems.append(f"{what}: {entry['file']} is missing")
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            problems.append(
                f"{what}: {entry['file']} has sha256 {digest[:12]}... but the manifest says {entry['sha256'][:12]}..."
            )
    if problems:
        raise StoreCorruptedError(
            f"the GradientStore in {str(directory)!r} is damaged: {len(problems)} file(s) do not match the "
            f"manifest: {'; '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}. Fix: delete the store and "
            "compute it again (or restore the files from a copy)."
        )
