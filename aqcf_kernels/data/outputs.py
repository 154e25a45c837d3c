"""Output folders of the command-line tools: checked before any work, created once, removed if left empty.

Every tool (``aqcf-synth``, ``aqcf-train``, ``aqcf-evaluate``, ``aqcf-explain``, ``aqcf-predict``,
``aqcf-export``) writes into a folder the user names. :func:`check_output_dir` refuses, in one line
naming the argument and the path, a path that is a file, lies under one, or cannot be created (a
read-only or virtual file system such as ``/proc``), before anything slow runs;
:func:`output_dir` then creates the folder and, if the work inside fails or is interrupted before any
file was written, removes what it created, so a failed command leaves no empty folder behind.
:func:`make_folder` checks and creates a folder that is not an output (``data.cache_dir``), its errors
prefixed by the config key that names it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputError", "check_folder", "check_output_dir", "make_folder", "output_dir"]


class OutputError(ValueError):
    """An output path that cannot be a folder (a file, under a file, not creatable); one line, no traceback.

    A ValueError, so the tools' existing one-line error handling (exit status 2) reports it.
    """


def check_output_dir(path: str | os.PathLike, argument: str) -> Path:
    """``path`` as a Path, if it is a folder or could be created as one; else :class:`OutputError`.

    ``argument`` names the command-line option in the message (``--out``, ``-o``, ``OUT``). Leaves
    nothing behind: the path itself and its nearest existing ancestor must be folders, and a missing
    path is created and removed again at once (an existing one gets a folder made and removed inside),
    so that a file system where ``mkdir`` fails (``/proc``, read-only mounts, where root's
    :func:`os.access` says yes) is refused now, not after the slow work.
    """
    path = Path(path).expanduser()
    return check_folder(path, f"{argument} {path}")


def check_folder(path: str | os.PathLike, label: str) -> Path:
    """:func:`check_output_dir` with the message's prefix (``label``, e.g. ``data.cache_dir=cache``) given whole."""
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{label}: exists and is not a folder")
        try:  # files can be made in it: a folder made and removed there says so where permission bits do not
            os.rmdir(tempfile.mkdtemp(prefix=".aqcf-check-", dir=path))
        except OSError as e:
            raise OutputError(f"{label}: cannot write in the folder ({e.strerror or e})") from None
        return path
    # Path.exists() is False below a regular file (ENOTDIR), so walk up to what does exist.
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{label}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{label}: cannot create it, {parent} is not writable")
            break
    top = _created_by_mkdir(path)
    if top is not None:  # the first folder mkdir would create: made and removed, to know that it can be
        try:
            top.mkdir()
        except FileExistsError:  # made meanwhile by someone else: theirs, not ours to remove
            return path
        except OSError as e:
            raise OutputError(f"{label}: cannot create the folder ({e.strerror or e})") from None
        with contextlib.suppress(OSError):  # someone wrote into it meanwhile: then it is theirs
            top.rmdir()
    return path


def make_folder(path: str | os.PathLike, label: str) -> Path:
    """Check (:func:`check_folder`) and create the folder ``path``; errors are an :class:`OutputError` starting
    with ``label`` (e.g. ``data.cache_dir=cache``), the name the user gave it."""
    path = check_folder(path, label)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{label}: cannot create the folder ({e.strerror or e})") from None
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
