"""Running a command the way every modelkin command runs: an expected failure is one line on stderr
and exit 2, an interrupt is exit 130. Shared by `modelkin` and the `merge_cal` shim."""

from __future__ import annotations

import sqlite3
import sys
from typing import Any

import typer

from .errors import ModelkinError

INTERRUPTED = 130


# Recent typer vendors its own click; take the base class from typer so either layout works.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def run_cli(command: Any, args: list[str] | None = None) -> int:
    """Runs a typer command, turning every expected failure into one line and exit code 2."""
    try:
        result = command.main(args=args, standalone_mode=False)
    except typer.Exit as done:
        return int(done.exit_code)
    except _ClickException as error:
        error.show()  # type: ignore[attr-defined]
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ModelkinError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except sqlite3.Error as error:  # the run store (a full disk, a damaged file)
        print(f"error: run store: {error}", file=sys.stderr)
        return 2
    if result == INTERRUPTED:  # typer turns KeyboardInterrupt into this exit code
        print("interrupted", file=sys.stderr)
    return result if isinstance(result, int) else 0
