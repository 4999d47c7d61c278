"""All-or-nothing output directories: written beside the target, renamed into place only when complete."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from hf_ftkit.errors import BadInputError
from hf_ftkit.units import format_bytes

_PARTIAL = ".partial-"


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise BadInputError(f"output {target} already exists; pass --overwrite or choose another --out.")
    if target.exists() and not target.is_dir():
        raise BadInputError(f"output {target} exists and is not a directory; choose another --out.")


def check_space(target: Path, needed: int) -> None:
    """Refuse up front when the output's filesystem cannot hold ``needed`` bytes (plus 1% slack)."""
    parent = _existing_parent(target)
    free = shutil.disk_usage(parent).free
    if free < needed * 1.01:
        raise BadInputError(
            f"the disk holding {target} has {format_bytes(free)} free but the output needs about "
            f"{format_bytes(needed)}; free space or choose another --out."
        )


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _remove_stale(target: Path) -> None:
    """Partial directories of earlier runs whose process is gone (killed outright, e.g. SIGKILL)."""
    for leftover in target.parent.glob(f".{target.name}{_PARTIAL}*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``target``; on success it replaces ``target``, on any error
    (including SIGTERM/SIGINT, disk full) it is deleted and ``target`` is left as it was.
    """
    target = target.absolute()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    partial = target.parent / f".{target.name}{_PARTIAL}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield partial
        _commit(partial, target)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise BadInputError(f"the disk filled up while writing {target}; free space and run again.") from None
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _commit(partial: Path, target: Path) -> None:
    if not target.exists():
        partial.rename(target)
        return
    retired = target.parent / f".{target.name}.replaced-{os.getpid()}"
    target.rename(retired)
    partial.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
