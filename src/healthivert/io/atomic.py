"""Atomic outputs: write to a temporary sibling, then rename over the target.

A stage that fails or is interrupted therefore never leaves a half-written file or folder behind, and
a temporary left by a process that died without cleaning up (SIGKILL, a power cut) is removed by the
next write of the same target. Temporaries are created like ``open`` and ``mkdir`` create files, so
outputs get the usual modes (0666 and 0777 less the umask), readable by a team or a pipeline step
running as another user. Every operating-system failure is raised as
:class:`~healthivert.errors.OutputError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from healthivert.errors import OutputError


def check_target(target: str | os.PathLike[str], folder: bool) -> None:
    """Refuse a target that cannot be written, before any work is done.

    Args:
        target: the file or folder to be written (it need not exist).
        folder: whether a folder (True) or a file (False) is to be written there.

    Raises:
        OutputError: ``target`` exists as the other kind, a component of its path is a file, or the
            folder that would hold it is not writable.
    """
    target = Path(target)
    try:
        if target.is_dir() and not folder:
            raise OutputError(target, "is a folder, a file is expected here", "remove it or choose a file name")
        if target.exists() and not target.is_dir() and folder:
            raise OutputError(target, "is a file, a folder is expected here", "remove it or choose another path")
        existing = next(parent for parent in target.parents if parent.exists())
        if not existing.is_dir():
            raise OutputError(target, f"{existing} is a file, not a folder", "choose another path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(existing, "folder not writable", f"cannot write {target} there")
    except OSError as exc:
        raise OutputError(target, f"cannot be reached: {exc.strerror or exc}") from exc


#: the name of a temporary folder made by :func:`atomic_dir` (files inside it need no stale clean-up).
_OWN_TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a temporary file or folder; a failure to delete never hides the error being handled."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries of ``target`` left by processes that no longer run; returns them.

    Temporaries are named ``.<name>.<pid>-<random>.tmp<suffixes>``; those of a running process
    (another writer of the same target) are kept. Older ones without a process id are removed.
    """
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(\d+)-)?\w+\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for candidate in target.parent.iterdir():
            match = pattern.match(candidate.name)
            if match is None or (match.group(1) is not None and _process_alive(int(match.group(1)))):
                continue
            _remove(candidate)
            removed.append(candidate)
    return removed


def _create_temporary(target: Path, folder: bool) -> Path:
    """A new empty sibling file or folder of ``target`` (after the checks and the stale clean-up)."""
    check_target(target, folder)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(target.parent, f"cannot create the folder: {exc.strerror or exc}") from exc
    if not any(_OWN_TEMPORARY.match(part) for part in target.parent.parts):  # a new folder holds nothing stale
        remove_stale_temporaries(target)
    suffix = "" if folder else "".join(target.suffixes)
    while True:
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(target.parent, f"cannot write here: {exc.strerror or exc}", f"writing {target.name}") from exc


def _replace(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise OutputError(target, f"cannot be replaced: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path of ``target``; on success rename it onto ``target``.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.parquet``) so writers that
    dispatch on the extension still work. On an exception (or an interrupt) the temporary file is removed.

    Raises:
        OutputError: ``target`` is a folder, or its folder cannot be created or written.
    """
    target = Path(target)
    tmp = _create_temporary(target, folder=False)
    try:
        yield tmp
        _replace(tmp, target)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target``; on success it replaces ``target`` whole.

    An existing ``target`` is only removed once the new folder is complete.

    Raises:
        OutputError: ``target`` is a file, or its folder cannot be created or written.
    """
    target = Path(target)
    tmp = _create_temporary(target, folder=True)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            _remove(old)
            _replace(target, old)
            _replace(tmp, target)
            _remove(old)
        else:
            _replace(tmp, target)
    finally:
        _remove(tmp)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)
