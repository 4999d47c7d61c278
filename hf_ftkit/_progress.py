"""Progress bars and ``--quiet``.

Bars are rich progress bars on stderr, shown only when stderr is a terminal and the command is not quiet.
``HF_FTKIT_PROGRESS=0`` turns them off everywhere, ``HF_FTKIT_PROGRESS=1`` forces them on (also when piped).
Libraries' own tqdm bars (transformers, datasets, the Trainer) follow the same rule through ``TQDM_DISABLE`` and
the Hugging Face ``*_DISABLE_PROGRESS_BARS`` variables, set when the CLI starts (a user's own settings win).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
_STATE = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    """Quiet: no progress bars and no library logging below errors (the CLI's ``--quiet``; the CLI also
    silences warnings for the command). Libraries not yet imported pick the settings up from the environment."""
    _STATE["quiet"] = quiet
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if not progress_enabled():
        os.environ.setdefault("TQDM_DISABLE", "1")  # the Trainer's and other plain tqdm bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars follow the hub's
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def progress_enabled() -> bool:
    """Whether bars are drawn: not quiet, not disabled, the first rank of a distributed run, and stderr is a
    terminal (or forced on)."""
    forced = os.environ.get("HF_FTKIT_PROGRESS")
    if _STATE["quiet"] or forced == "0" or os.environ.get("RANK", "0") != "0":
        return False
    return forced == "1" or sys.stderr.isatty()


def _bar(*columns: Any) -> Any:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True, force_terminal=os.environ.get("HF_FTKIT_PROGRESS") == "1" or None)
    return Progress("[progress.description]{task.description}", *columns, console=console, transient=True)


@contextmanager
def byte_progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A bar fed ``(done, total)`` byte counts; yields None (no bar) when bars are off."""
    if not progress_enabled():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn

    with _bar(BarColumn(), DownloadColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a bar (count, elapsed, remaining) when bars are on; plain iteration otherwise."""
    if not progress_enabled():
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn

    with _bar(BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        size = total if total is not None else (len(items) if isinstance(items, Sized) else None)
        task = bar.add_task(label, total=size)
        for item in items:
            yield item
            bar.advance(task)


@contextmanager
def status(label: str) -> Iterator[None]:
    """A spinner with ``label`` for one step of unknown length (loading, converting) when bars are on."""
    if not progress_enabled():
        yield
        return
    from rich.progress import SpinnerColumn, TimeElapsedColumn

    with _bar(SpinnerColumn(), TimeElapsedColumn()) as bar:
        bar.add_task(label, total=None)
        yield
