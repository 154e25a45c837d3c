"""Output folders of the command-line tools: checked before any work, created once, removed if left empty.

Every tool (``aqcf-synth``, ``aqcf-train``, ``aqcf-evaluate``, ``aqcf-explain``, ``aqcf-predict``,
``aqcf-export``) writes into a folder the user names. :func:`check_output_dir` refuses, in one line
naming the argument and the path, a path that is a file or lies under one, before anything slow runs;
:func:`output_dir` then creates the folder and, if the work inside fails or is interrupted before any
file was written, removes what it created, so a failed command leaves no empty folder behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputError", "check_output_dir", "output_dir"]


class OutputError(ValueError):
    """An output path that cannot be a folder (a file, under a file, not creatable); one line, no traceback.

    A ValueError, so the tools' existing one-line error handling (exit status 2) reports it.
    """


def check_output_dir(path: str | os.PathLike, argument: str) -> Path:
    """``path`` as a Path, if it is a folder or could be created as one; else :class:`OutputError`.

    ``argument`` names the command-line option in the message (``--out``, ``-o``, ``OUT``). Checks
    without creating anything: the path itself and its nearest existing ancestor must be folders.
    """
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{argument} {path}: exists and is not a folder")
        return path
    # Path.exists() is False below a regular file (ENOTDIR), so walk up to what does exist.
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{argument} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{argument} {path}: cannot create it, {parent} is not writable")
            break
    return path


def _created_by_mkdir(path: Path) -> Path | None:
    """The top-most folder ``path.mkdir(parents=True)`` would create (None if ``path`` exists)."""
    top = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        top = candidate
    return top


def _holds_files(folder: Path) -> bool:
    return any(files for _, _, files in os.walk(folder))


@contextmanager
def output_dir(path: str | os.PathLike, argument: str) -> Iterator[Path]:
    """Check (:func:`check_output_dir`) and create ``path``; yield it.

    If the body raises (any exception, Ctrl-C included) while nothing has been written below the
    folders this call created, those folders are removed again: a failed run leaves no empty
    output folder. Folders that existed before, or that hold any file, are always kept.
    """
    path = check_output_dir(path, argument)
    created = _created_by_mkdir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{argument} {path}: cannot create the folder ({e.strerror or e})") from None
    try:
        yield path
    except BaseException:
        if created is not None and created.is_dir() and not _holds_files(created):
            shutil.rmtree(created, ignore_errors=True)
        raise
