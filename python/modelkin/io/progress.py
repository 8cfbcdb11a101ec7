"""A progress bar on stderr for passes long enough to need one."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

# Passes shorter than this finish before a bar would be worth drawing.
SHOW_AFTER_S = 1.0


class PassProgress:
    """A callable ``(done_bytes, total_bytes)`` that draws a bar once the pass has run ~1 s."""

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self._description = description
        self._enabled = enabled
        self._started = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled or total <= 0:
            return
        if self._bar is None:
            if time.monotonic() - self._started < SHOW_AFTER_S:
                return
            # rich is imported here, by the first pass long enough for a bar, not by every command.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._description, total=total)
        assert self._task is not None
        self._bar.update(self._task, completed=done, total=total)

    def __enter__(self) -> PassProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
