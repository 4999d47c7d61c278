"""All-or-nothing output directories: written beside the target, renamed into place only when complete.

What ``--overwrite`` may replace: only a directory hf-ftkit wrote itself (it holds ``MARKER``), or an empty
one; never ``/``, the home directory, the working directory or one above it, nor a directory that is or
contains one of the command's inputs. The final rename refuses a target that appeared while the output was
being written (another process's), so two writers to one ``--out`` cannot both succeed.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from hf_ftkit.errors import BadInputError
from hf_ftkit.units import format_bytes

MARKER = "hf_ftkit_output.json"  # written into every output directory hf-ftkit commits
_PARTIAL = ".partial-"
_REPLACED = ".replaced-"
_SCRATCH = ".hf-ftkit-scratch-"


def _owner_tag() -> str:
    """``HOST-PID``: a leftover is stale only when its process is gone from this host (shared disks)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def check_target(target: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an ``--out`` that exists (without ``overwrite``) or that ``overwrite`` may not replace."""
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise BadInputError(f"output {target} exists and is not a directory; choose another --out.")
    if not target.exists():
        _check_parent(target)
        return
    if not overwrite:
        raise BadInputError(f"output {target} already exists; pass --overwrite or choose another --out.")
    resolved = target.resolve()
    protected = {Path("/"), Path.home().resolve()}
    cwd = Path.cwd().resolve()
    if resolved in protected or cwd == resolved or resolved in cwd.parents:
        raise BadInputError(f"--overwrite will not replace {target}, which is the root, your home or the working "
                            "directory (or holds it); choose a new --out.")
    for item in inputs:
        path = Path(item).expanduser().absolute()
        if path.exists() and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise BadInputError(f"--overwrite will not replace {target}: it is or contains the input {item}; "
                                "choose a new --out.")
    if not (target / MARKER).is_file() and any(target.iterdir()):
        raise BadInputError(f"--overwrite only replaces a directory hf-ftkit wrote, and {target} holds other files "
                            f"(no {MARKER}); choose a new --out or empty it yourself.")


def _check_parent(target: Path) -> None:
    parent = _existing_parent(target.parent)
    if not parent.is_dir():
        raise BadInputError(f"--out {target} lies under the file {parent}; choose a directory path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write into {parent} (permission denied); choose another --out.")


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


def remove_stale(folder: Path) -> None:
    """Clean what killed runs (SIGKILL, power loss) left in ``folder``: partial outputs and scratch of dead
    processes of this host are deleted; a directory retired mid-replace goes back where it was when nothing
    replaced it."""
    host = socket.gethostname()
    for leftover in sorted(folder.glob(".*")):
        for kind in (_PARTIAL, _REPLACED, _SCRATCH):
            owner = leftover.name.rpartition(kind)[2] if kind in leftover.name else ""
            pid = owner.rsplit("-", 1)[-1]
            if not owner.startswith(f"{host}-") or not pid.isdigit() or _alive(int(pid)):
                continue
            original = folder / leftover.name[1:].rpartition(kind)[0]
            if kind == _REPLACED and not original.exists():
                leftover.rename(original)  # killed between the two renames: the old output comes back
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scratch_directory(target: Path) -> Path:
    """A fresh scratch folder beside ``target`` (same disk, cleaned by ``remove_stale`` if the run is killed)."""
    return _fresh_sibling(target.absolute(), _SCRATCH)


def _fresh_sibling(target: Path, kind: str) -> Path:
    """An empty ``.NAME<kind>HOST-PID`` folder beside ``target``, after cleaning what dead runs left there."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create {target.parent} ({exc.strerror}); choose another --out.") from None
    remove_stale(target.parent)
    path = target.parent / f".{target.name}{kind}{_owner_tag()}"
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir()
    except OSError as exc:
        raise BadInputError(f"cannot write into {target.parent} ({exc.strerror or exc}); choose another --out.") \
            from None
    return path


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = (),
                     marker: str = "{}\n") -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``target``; on success it replaces ``target``, on any error
    (including SIGTERM/SIGINT, disk full) it is deleted and ``target`` is left as it was.

    ``marker`` (JSON) is written as ``MARKER`` into the output, so a later ``--overwrite`` knows hf-ftkit wrote it.
    """
    target = target.absolute()
    check_target(target, overwrite, inputs)
    existed = target.exists()
    partial = _fresh_sibling(target, _PARTIAL)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield partial
        (partial / MARKER).write_text(marker)
        _respect_umask(partial)
        _commit(partial, target, existed, overwrite, inputs)
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


def _respect_umask(folder: Path) -> None:
    """Files as the user's umask makes them (some writers, safetensors among them, create 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def _commit(partial: Path, target: Path, existed: bool, overwrite: bool, inputs: Sequence[str | Path]) -> None:
    """Rename ``partial`` to ``target``. Only a target that existed (and was allowed) at the start is replaced:
    one that appeared meanwhile belongs to another writer, and the rename fails rather than replace it."""
    if not existed or not target.exists():
        try:
            partial.rename(target)  # fails on a non-empty directory that another process put there meanwhile
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise BadInputError(f"{target} appeared while this merge was writing (another process wrote it); "
                                "nothing was replaced: choose another --out.") from None
        return
    check_target(target, overwrite, inputs)  # still one hf-ftkit wrote
    retired = target.parent / f".{target.name}{_REPLACED}{_owner_tag()}"
    target.rename(retired)
    try:
        partial.rename(target)
    except OSError:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
