"""One driver per run directory: an OS lock (``flock``) on a file in the run directory, held for the
whole run. The kernel releases it when the process dies, so ``kill -9`` never leaves a stale lock;
readers (``runs show/tree/best``) never take it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from .errors import RunError

LOCK_NAME = "driver.lock"


class RunLock:
    """Held while a driver runs; ``release`` (or the process's death) frees it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"{run_dir}: a driver is already running this run ({holder})") from None
        self.fd: int | None = fd

    def announce(self) -> None:
        """Names this driver in the lock file, for a second driver's error message: done once the
        run is claimed, so a driver refused for another reason leaves the directory as it was."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = None
