"""Running a command the way every modelkin command runs: an expected failure is one line on stderr
and exit 2; an interrupt (Ctrl-C, SIGTERM, SIGHUP: see signals.py) cleans up and exits 128 + the
signal's number (130, 143, 129). Shared by `modelkin` and the `merge_cal` shim."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import typer

from .errors import ModelkinError
from .signals import Interrupts, interrupts_as_ctrl_c

INTERRUPTED = 130


# Recent typer vendors its own click; take the base class from typer so either layout works.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def run_cli(command: Any, args: list[str] | None = None) -> int:
    """Runs a typer command, turning every expected failure into one line and exit code 2, and
    SIGTERM and SIGHUP into the interrupt Ctrl-C is (handlers installed for this call only)."""
    with interrupts_as_ctrl_c() as interrupts:
        try:
            return _run(command, args, interrupts)
        except KeyboardInterrupt:
            # A second signal while the first one's failure was being reported.
            return _interrupted(interrupts)


def _run(command: Any, args: list[str] | None, interrupts: Interrupts) -> int:
    try:
        result = command.main(args=args, standalone_mode=False)
    except typer.Exit as done:
        result = int(done.exit_code)
    except _ClickException as error:
        error.show()  # type: ignore[attr-defined]
        return 2
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted(interrupts)
    except (ModelkinError, OSError, ValueError) as error:
        if interrupts.signum is not None:
            # Cleaning up after the signal failed (a hung-up terminal refuses the progress bar's
            # last write): the command was still interrupted, and says so.
            return _interrupted(interrupts)
        _say(f"error: {error}")
        return 2
    except Exception as error:
        # The run store (a full disk, a damaged file). sqlite3 is looked up, not imported: only the
        # commands that open a store load it, and where it is not loaded, none of its errors exist.
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is None or not isinstance(error, sqlite3.Error):
            raise
        _say(f"error: run store: {error}")
        return 2
    if result == INTERRUPTED:  # typer turns KeyboardInterrupt into this exit code
        return _interrupted(interrupts)
    return result if isinstance(result, int) else 0


def _interrupted(interrupts: Interrupts) -> int:
    _say("interrupted" if interrupts.exit_code == INTERRUPTED else f"interrupted ({interrupts.name})")
    return interrupts.exit_code


def _say(line: str) -> None:
    """One line on stderr, unless stderr is gone (SIGHUP: the terminal closed)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)
