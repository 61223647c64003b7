"""One writer per GradientStore: a lock file that names its holder, and a rule for taking over a stale one.

Two processes filling the same store would both compute every missing chunk (and race on the manifest), so
:meth:`GradientStore.fill <datatrace.projection.store.GradientStore.fill>` first takes ``fill.lock`` in the store
folder. The file is created with ``O_CREAT | O_EXCL`` (atomic on POSIX and Windows file systems, and on NFS v3+),
so at most one process creates it; it holds the holder's pid, host name and start time as JSON, and the holder
touches it (its modification time is the *heartbeat*) after every chunk or round it records. Under
torch.distributed only rank 0 takes it: the store is one writer, whatever its number of ranks.

A lock that is held makes a second fill fail at once with a :class:`~datatrace.errors.StoreLockedError` naming the
holder. A lock is **stale**, and taken over with a warning, when

* its holder ran on this host and that process no longer exists (a crashed or killed run), or
* its heartbeat is older than :data:`STALE_SECONDS` (a holder on another host that stopped touching it), or
* it cannot be read (a crash between creating and writing it) and is older than :data:`UNREADABLE_GRACE_SECONDS`.

A stale lock is first renamed to a unique name (one process wins the rename) and its content is compared with
what was judged stale, so two processes resuming the same crashed run at once do not both take it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from datatrace.errors import StoreLockedError

__all__ = ["LOCK", "STALE_SECONDS", "UNREADABLE_GRACE_SECONDS", "StoreLock"]

logger = logging.getLogger(__name__)

LOCK = "fill.lock"
#: a lock whose heartbeat is older than this (seconds) is stale even if its holder cannot be checked
STALE_SECONDS = 6 * 3600
#: an unreadable lock younger than this (seconds) may still be being written by its holder
UNREADABLE_GRACE_SECONDS = 60


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (True when it cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows: rely on the heartbeat there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


class StoreLock:
    """The fill lock of the store folder ``directory`` (module docstring); a context manager.

    Args:
        directory: the store folder. stale_seconds: the heartbeat age after which a lock is stale.
    """

    def __init__(self, directory: str | os.PathLike, stale_seconds: float = STALE_SECONDS) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.stale_seconds = float(stale_seconds)
        self.held = False
        self._content = b""

    # -- taking and giving back ----------------------------------------------------------------------------------
    def acquire(self) -> StoreLock:
        """Take the lock (taking over a stale one); a StoreLockedError naming the holder if it is held."""
        if self.held:
            return self
        for _attempt in range(2):
            if self._create():
                return self
            content, age = self._read()
            reason = self._stale_reason(content, age)
            if reason is None:
                raise self._held_error(content, age)
            self.break_stale(content, reason)
        content, age = self._read()
        raise self._held_error(content, age)

    def release(self) -> None:
        """Give the lock back (remove the file if it is still ours)."""
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_bytes() == self._content:
                os.remove(self.path)
        except OSError:
            pass

    def heartbeat(self) -> None:
        """Mark the lock as alive (touch it), so that a long fill is never taken for a stale one."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError as err:
                logger.warning("could not touch the store lock %s: %s", self.path, err)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- internals -----------------------------------------------------------------------------------------------
    def _create(self) -> bool:
        now = time.time()
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now,
            "started_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "token": secrets.token_hex(8),
        }
        content = json.dumps(info).encode()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, content)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.remove(self.path)  # never leave a lock that names no holder
            raise
        os.close(fd)
        self.held, self._content = True, content
        return True

    def _read(self) -> tuple[bytes | None, float]:
        """The lock's bytes (None if it vanished) and its heartbeat age in seconds."""
        try:
            age = time.time() - self.path.stat().st_mtime
            return self.path.read_bytes(), age
        except FileNotFoundError:
            return None, 0.0

    @staticmethod
    def _holder(content: bytes | None) -> dict[str, Any] | None:
        try:
            info = json.loads(content or b"")
        except ValueError:
            return None
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("pid"), int)
            or not isinstance(info.get("host"), str)
        ):
            return None
        return info

    def _stale_reason(self, content: bytes | None, age: float) -> str | None:
        if content is None:
            return "it was just given back"
        info = self._holder(content)
        if info is None:
            if age > UNREADABLE_GRACE_SECONDS:
                return f"it cannot be read and is {age:.0f} s old"
            return None
        if info["host"] == socket.gethostname() and not _process_exists(info["pid"]):
            return f"its process {info['pid']} no longer runs on this host"
        if age > self.stale_seconds:
            return f"its holder has not touched it for {age / 3600:.1f} h (more than {self.stale_seconds / 3600:g} h)"
        return None

    def break_stale(self, content: bytes | None, reason: str) -> None:
        """Remove a stale lock whose bytes are ``content``, unless another process replaced it meanwhile."""
        if content is None:
            return
        aside = self.directory / f".{LOCK}.stale-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process broke it first
        try:
            taken = aside.read_bytes()
        except OSError:
            taken = None
        if taken != content:  # a live lock taken meanwhile by another process: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        logger.warning(
            "GradientStore lock %s was stale (%s); taking it over to resume the fill.", self.path, reason
        )

    def _held_error(self, content: bytes | None, age: float) -> StoreLockedError:
        info = self._holder(content)
        if info is None:
            holder = "an unknown process (the lock file cannot be read yet)"
        else:
            holder = (
                f"process {info['pid']} on host {info['host']!r}, started {info.get('started_utc', '?')}, last "
                f"heartbeat {age:.0f} s ago"
            )
        return StoreLockedError(
            f"the GradientStore in {str(self.directory)!r} is being filled by {holder} (lock file {self.path}). "
            "Two processes filling one store would both compute every chunk. Fix: wait for that run to finish and "
            "call again (its chunks are reused), or, if it no longer runs, delete the lock file. A lock whose "
            f"process is gone on this host, or untouched for {self.stale_seconds / 3600:g} h, is taken over "
            "automatically."
        )
