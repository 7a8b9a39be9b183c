"""One process at a time per run directory: a second command on a running run's directory refuses and names the
process that holds it. Under launchers (torchrun, SLURM, Lightning's subprocesses) only the launcher's rank zero
takes the lock. Stdlib only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive OS lock (``fcntl.flock``) on ``DIR/.lock``, which names its holder (``pid``, ``host``).

    The kernel releases it when the process ends, however it ends (kill -9 included): a stale ``.lock`` file
    left behind blocks nothing. Released explicitly by :meth:`release` (or at the end of a ``with`` block).
    """

    def __init__(self, directory: str | Path, flag: str = "--out"):
        import fcntl
        import socket

        self.directory = Path(directory).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"{flag} '{self.directory}' is a file, not a directory: choose a new directory for {flag}")
        # the directories made here, deepest first: a refused command removes them again (it wrote nothing)
        self._created = [parent for parent in (self.directory, *self.directory.parents) if not parent.exists()]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOCK_FILE
        self._existed = self.path.is_file()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"{flag} '{self.directory}' is in use by another leanmim process ({holder}): wait for "
                              f"it to end, or choose another {flag}") from None
        self._previous = (os.read(self._fd, 4096), os.fstat(self._fd)) if self._existed else None
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())

    def release_untouched(self) -> None:
        """Release, leaving ``.lock`` as it was before (a rerun of a finished run changes no file)."""
        if self._fd is None:
            return
        if self._previous is None:
            self.path.unlink(missing_ok=True)
        else:
            content, stat = self._previous
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, content)
            os.utime(self._fd, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        self.release()
        for directory in self._created:
            try:
                directory.rmdir()   # only when empty: anything written there since stays
            except OSError:
                break

    def _holder(self) -> str:
        try:
            with open(self.path) as handle:
                record = json.loads(handle.read() or "{}")
            return f"PID {record['pid']} on host {record['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its PID and host are not written yet"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[str, RunLock] = {}


def hold_directory(directory: str | Path, flag: str = "--out") -> RunLock:
    """This process's lock on ``directory`` for the rest of its life (taken once; a later call reuses it)."""
    key = os.path.realpath(os.path.expanduser(str(directory)))
    held = _HELD.get(key)
    if held is None or held._fd is None:
        held = _HELD[key] = RunLock(directory, flag)
    return held


def is_launcher_rank_zero() -> bool:
    """True outside a launcher, and on global rank 0 under torchrun / SLURM (before any process group exists)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):   # LOCAL_RANK: Lightning's own subprocess launcher
        if os.environ.get(name, "0").strip() not in ("", "0"):
            return False
    return True
