"""Faults of the machine, told apart from failures of a candidate.

A candidate fails for its own reasons only: the evaluator ran and reported an error or a non-finite
score, or its recipe cannot be merged. A full disk, a read-only or unwritable file system, an I/O
error, or a worker process or cluster node lost is the machine's fault: charging it to the candidate
would change what the search selects. Such a fault leaves the candidate pending, is recorded in the
store as a fault (never as a failure), and stops the run with one line naming it; resuming after the
fault is mended ends exactly as a run that never met it."""

from __future__ import annotations

import errno
import sqlite3

from .errors import RunError

# errno values that say the machine, not the candidate, is at fault.
MACHINE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "I/O error",
}
# How often a job is retried after its worker process (or Ray node) was lost, before the run stops.
WORKER_LOSS_RETRIES = 2


class MachineFault(RunError):
    """The run stopped on a fault of the machine or the cluster; the command exits 1."""


def machine_fault(error: BaseException) -> str | None:
    """The one-line description of a machine fault behind ``error`` (anywhere in its chain of
    causes: a merge reports an OSError under its own message), or None for the candidate's own error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in MACHINE_ERRNOS:
            where = current.filename if current.filename is not None else None
            detail = f": {where}" if where is not None else f" ({current.strerror or current})"
            return f"{MACHINE_ERRNOS[current.errno]}{detail}"
        if isinstance(current, OSError) and current.errno is None and _named_fault(str(current)):
            return _named_fault(str(current))
        if isinstance(current, sqlite3.OperationalError) and "full" in str(current):
            return f"no space left on device (run store: {current})"
        current = current.__cause__ or current.__context__
    return None


def _named_fault(message: str) -> str | None:
    """Errors raised by the Rust engine carry the OS's message but no errno: read the message."""
    lowered = message.lower()
    for code, name in MACHINE_ERRNOS.items():
        if f"os error {code})" in lowered or name in lowered:
            return message.splitlines()[0]
    return None
