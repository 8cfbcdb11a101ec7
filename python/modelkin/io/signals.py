"""SIGTERM and SIGHUP handled as Ctrl-C, for the command-line entry points only.

`kill`, service managers and batch schedulers stop a process with SIGTERM, and a closed terminal or
ssh session hangs it up with SIGHUP; by default either ends Python at once, so no ``finally`` runs:
a merge's temporary directory stays beside its output and worker processes are left to notice
alone. Raising a KeyboardInterrupt instead sends both down the path every clean-up already takes
for Ctrl-C, in Python and in the Rust engine (which polls Python's signals while it works and
cancels its pass on a pending KeyboardInterrupt). The signal's number is recorded apart from the
exception, because what reaches the command's caller may be a fresh KeyboardInterrupt (the engine
raises its own when cancelled) or typer's exit code 130.

Library calls never change signal handling: only :func:`interrupts_as_ctrl_c`, which the CLI
entry points enter, installs handlers, and it puts the previous ones back on leaving."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

# What signal.getsignal returns and signal.signal takes.
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

# Handled as Ctrl-C; SIGINT itself keeps Python's handler (wrapped only to record its number).
TERMINATING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupts:
    """The first interrupting signal received while :func:`interrupts_as_ctrl_c` was entered."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def exit_code(self) -> int:
        """The shell's convention, 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM,
        129 for SIGHUP (130 when an interrupt came with no signal recorded)."""
        return 128 + (self.signum if self.signum is not None else signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum if self.signum is not None else signal.SIGINT).name

    def _record(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum

    def _terminate(self, signum: int, frame: FrameType | None) -> None:
        self._record(signum)
        raise Terminated(signum)

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        self._record(signum)
        signal.default_int_handler(signum, frame)


@contextmanager
def interrupts_as_ctrl_c() -> Iterator[Interrupts]:
    """While entered, SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt) as SIGINT
    raises KeyboardInterrupt, and the first of the three to arrive is recorded. A signal whose
    handler is not the default is left alone: ``nohup`` ignores SIGHUP, a background job started by
    a script ignores SIGINT, an embedding program may have its own. Off the main thread (where
    Python cannot install handlers) nothing is installed."""
    interrupts = Interrupts()
    previous: dict[int, Handler] = {}
    if threading.current_thread() is threading.main_thread():
        wanted: list[tuple[int, Handler, Handler]] = [(s, signal.SIG_DFL, interrupts._terminate) for s in TERMINATING]
        wanted.append((signal.SIGINT, signal.default_int_handler, interrupts._interrupt))
        for signum, default, handler in wanted:
            current = signal.getsignal(signum)
            if current == default:
                previous[signum] = signal.signal(signum, handler)
    try:
        yield interrupts
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
