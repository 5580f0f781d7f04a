"""Terminal output: a stderr console for humans, stdout for results, progress bars with rate and ETA."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit given as the task's ``unit`` field."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if task.speed is None:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


class _NullProgress:
    """Stands in for a Progress when bars are hidden (--quiet, --json, non-main processes)."""

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def advance(self, *args: object, **kwargs: object) -> None:
        pass

    def update(self, *args: object, **kwargs: object) -> None:
        pass


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Progress | _NullProgress]:
    """A rich progress display on stderr (rate and ETA on every bar), or a silent stand-in."""
    if not enabled:
        yield _NullProgress()
        return
    bar = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, transient=False,
    )
    with bar:
        yield bar


def error_line(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        err.print(message)


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
