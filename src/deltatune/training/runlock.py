"""One run per output directory: an OS advisory lock held for the whole run, and a sweep of killed saves' leftovers.

The lock is ``flock`` on ``.deltatune.lock`` inside the output directory. The kernel drops it when the process
ends, however it ends (``kill -9`` included), so a crashed run never leaves a stale lock behind: the lock file
may stay, the lock does not. The file holds the holder's pid, for the message the next run prints.
On systems without ``fcntl`` (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import time

from deltatune.core.io import sweep_stale_temp_files
from deltatune.errors import DeltatuneError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".deltatune.lock"


class OutputDirInUseError(DeltatuneError, RuntimeError):
    """Another live process is training into the same output directory."""


def _in_use(directory: str, pid: int | None) -> OutputDirInUseError:
    who = f"a running deltatune train (pid {pid})" if pid else "another running deltatune train"
    return OutputDirInUseError(f"--output-dir {directory} is in use by {who}; wait for it to finish (or stop it), "
                               "or choose another --output-dir")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii").strip() or 0) or None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def holder(directory: str) -> int | None:
    """The pid of the live run holding ``directory``'s lock (0 if it wrote none yet), or ``None`` if it is free."""
    path = os.path.join(directory, LOCK_NAME)
    if fcntl is None or not os.path.exists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on ``directory`` (which must exist) for as long as this object holds it.

    Raises (on :meth:`acquire`):
        OutputDirInUseError: another live process holds it.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # A few quick retries: a concurrent holder() probe holds a shared lock for microseconds.
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise _in_use(self.directory, pid) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_free(directory: str) -> None:
    """Refuse at once when a live run holds ``directory`` (before any other check reads its files).

    Raises:
        OutputDirInUseError: naming the holder's pid.
    """
    pid = holder(directory)
    if pid is not None:
        raise _in_use(directory, pid)


def sweep_temp_files(*directories: str) -> list[str]:
    """Delete ``.tmp-*`` files that killed saves left in ``directories``, after completing any interrupted adapter
    save whose journal names them. Call only while holding the run lock: then no live process of this run is
    writing them, so their age does not matter."""
    removed: list[str] = []
    for directory in directories:
        if os.path.isdir(directory):
            removed += sweep_stale_temp_files(directory, min_age_s=0)
    return removed
