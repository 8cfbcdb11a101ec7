"""Temporary directories beside an output: named after their writer, made with the umask's
permissions, and removed by the next writer of the same output once their own writer is dead.

An output OUT is written into ``.OUT.modelkin-HOST-PID-RANDOM`` in OUT's directory and renamed
into place when complete (an OUT it replaces is set aside as ``.OUT.modelkin-HOST-PID-old-RANDOM``
until then). A writer killed outright (SIGKILL, a lost machine) leaves its directory behind; the
name tells the next writer of OUT whether that writer is gone: same host and no process with that
pid. A directory of another host is left alone, as its writer cannot be checked from here. Names
from modelkin before this scheme (``.OUT.modelkin-XXXXXXXX``, ``.OUT.modelkin-old-PID``) carry no
host: such a directory counts as stale once nothing in it has changed for an hour
(:data:`UNNAMED_STALE_S`), far longer than any writer leaves its output's files untouched.

Directories are made with mode 0o777 and files with 0o666, both less the umask, as mergekit's and
every ordinary program's are (``tempfile.mkdtemp`` would make 0o700, which the rename would then
publish as the output's mode)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

# How long a temporary directory that names no writer stays untouched before it counts as stale.
UNNAMED_STALE_S = 3600.0

# What follows ``.OUT.modelkin-``: this scheme's names, and the older ones without a host.
_NAMED = re.compile(r"(?P<host>.+)-(?P<pid>\d+)-(?:old-)?[0-9a-f]{8}")
_UNNAMED = re.compile(r"[a-z0-9_]{8}|old-\d+")


def host_name() -> str:
    """This machine's name as it appears in a temporary directory's name (path-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"


def _prefix(out: Path) -> str:
    return f".{out.name}.modelkin-"


def _writer() -> str:
    return f"{host_name()}-{os.getpid()}"


def staging_dir(out: Path) -> Path:
    """A new empty directory beside ``out`` (in ``out.parent``, which must exist) to write it in."""
    for _ in range(100):
        path = out.with_name(f"{_prefix(out)}{_writer()}-{secrets.token_hex(4)}")
        try:
            path.mkdir()  # mode 0o777 less the umask, as the finished output's must be
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{out}: no free name for a temporary directory beside it")


def set_aside_path(out: Path) -> Path:
    """Where an ``out`` being replaced is moved until its successor is in place."""
    return out.with_name(f"{_prefix(out)}{_writer()}-old-{secrets.token_hex(4)}")


def remove_stale(out: Path) -> list[Path]:
    """Removes the temporary directories beside ``out`` (for ``out`` only) that a dead writer left,
    each with one line on stderr; returns them."""
    prefix = _prefix(out)
    try:
        entries = [e for e in os.scandir(out.parent) if e.name.startswith(prefix)]
    except OSError:
        return []  # the directory is unreadable or absent: the write reports that itself
    removed = []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        why = _stale(path, entry.name[len(prefix) :])
        if why is None:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            continue  # not ours to remove (permissions), or another writer is removing it too
        print(f"removed stale temporary directory {path} {why}", file=sys.stderr)
        removed.append(path)
    return removed


def _stale(path: Path, rest: str) -> str | None:
    """Why the directory is stale (for the message), or None when it is not, or may not be."""
    named = _NAMED.fullmatch(rest)
    if named is not None:
        host, pid = named["host"], int(named["pid"])
        if host != host_name() or _alive(pid):
            return None
        return f"left by pid {pid} on {host}"
    if _UNNAMED.fullmatch(rest) is not None:
        untouched = time.time() - _last_change(path)
        if untouched > UNNAMED_STALE_S:
            return f"left by an earlier modelkin (untouched for {untouched / 3600:.1f} hours)"
    return None


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal exists too). A reused
    pid reads as alive: its directory stays, which is the safe mistake."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def _last_change(path: Path) -> float:
    """The latest modification time of the directory and what it holds directly (a writer's files
    are there: a file being written keeps changing while the directory's own time stands still)."""
    try:
        latest = path.lstat().st_mtime
        for entry in os.scandir(path):
            latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return time.time()  # vanishing as we look: someone is working on it
    return latest


def copy_tree(source: Path, target: Path) -> None:
    """Copies a directory's files as new files (modes from the umask, times of now), unlike
    ``shutil.copytree``, which gives each copy its source's mode. Links are followed, as
    ``copytree`` follows them by default (a Hugging Face snapshot's files are links)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.is_dir():
            copy_tree(entry, target / entry.name)
        else:
            shutil.copyfile(entry, target / entry.name)
