"""Progress bars (rich). One live display at a time: an outer :func:`progress_session` (the CLI's)
hosts the bars that library code opens with :func:`progress_bar`; without one, each bar is its own
transient display."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_active = None  # the rich Progress of the enclosing progress_session, if any


def _columns():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


@contextmanager
def progress_session(enabled: bool = True) -> Iterator[None]:
    """Host every :func:`progress_bar` opened inside the block in one live display."""
    global _active
    if not enabled or _active is not None:
        yield
        return
    from rich.progress import Progress

    with Progress(*_columns(), transient=False) as progress:
        _active = progress
        try:
            yield
        finally:
            _active = None


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, status="")``; draws a bar when ``enabled`` (removed when done inside a session)."""
    if not enabled:
        yield lambda n=1, status="": None
        return
    if _active is not None:
        task = _active.add_task(description, total=total, status="")
        try:
            yield lambda n=1, status="": _active.update(task, advance=n, status=status)
        finally:
            _active.remove_task(task)
        return
    from rich.progress import Progress

    with Progress(*_columns(), transient=True) as progress:
        task = progress.add_task(description, total=total, status="")
        yield lambda n=1, status="": progress.update(task, advance=n, status=status)


def progress_print(*objects) -> None:
    """Print a line above the live bars of the enclosing session (or plainly without one)."""
    if _active is not None:
        _active.console.print(*objects)
    else:
        from rich.console import Console

        Console().print(*objects)
