"""An exclusive, crash-safe lock on an output path: ``flock`` on ``<output>.lock``.

The kernel drops an ``flock`` when its process dies, so a killed ``unlearn apply`` never leaves a
stale lock behind; the lock file itself stays (it holds the last holder's pid, for the error message).
"""

from __future__ import annotations

import os
from pathlib import Path


class LockedError(RuntimeError):
    """Another process holds the lock."""


class OutputLock:
    """``with OutputLock(path): ...`` holds ``<path>.lock`` exclusively or raises :class:`LockedError`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.target = Path(path)
        self.path = self.target.with_name(self.target.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError as e:  # pragma: no cover - non-POSIX
            raise NotImplementedError("unlearn apply's output lock needs POSIX flock (Linux, macOS)") from e
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise LockedError(
                f"another unlearn apply (pid {holder}) is writing {self.target}; wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
