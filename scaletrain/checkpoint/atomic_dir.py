"""Replacing a whole output directory at once: write the new contents beside it, then swap.

Writing an export into a directory that already holds one would leave the old export's files next to
the new ones (a stale model.safetensors beside new shards and their index: loaders then read both).
`replaces_directory` runs the writer on `.NAME.tmp` beside NAME, fsyncs it, and swaps it in: on Linux
with renameat2(RENAME_EXCHANGE), one atomic step (a reader sees the old or the new directory, never a
mix and never none); where that is unavailable, with two renames (NAME is briefly absent, never
mixed). The old contents are deleted afterwards; a writer that fails leaves NAME untouched and no
temporary directory behind.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import inspect
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories themselves."""
    for f in path.iterdir():
        if f.is_dir() and not f.is_symlink():
            fsync_tree(f)
        elif f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the
    system or the filesystem does not offer it."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def swap_in(staging: Path, final: Path) -> None:
    """Make the complete directory `staging` be `final`, replacing what was there; `staging` is gone after."""
    fsync_tree(staging)
    if not (final.exists() or final.is_symlink()):
        os.replace(staging, final)
    elif exchange(staging, final):
        _remove(staging)  # now the old contents
    else:
        old = final.parent / f".{final.name}.old"
        _remove(old)
        os.replace(final, old)
        os.replace(staging, final)
        _remove(old)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(final: Path, marker: str) -> None:
    """Refuse to replace anything but a missing or empty directory or one that holds `marker` (a
    previous output of the same kind): the whole directory is replaced, other files included."""
    if not (final.exists() or final.is_symlink()):
        return
    if not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a directory; choose another output directory.")
    if any(final.iterdir()) and not (final / marker).is_file():
        raise FileExistsError(f"{final} is not empty and holds no {marker}, so it is not an earlier output this "
                              "command would replace (the whole directory is replaced); choose a new or empty "
                              "directory.")


def replaces_directory(param: str, marker: str) -> Callable[[F], F]:
    """Decorate a writer whose argument `param` is its output directory: it writes into a fresh
    directory beside it, which then replaces the output as a whole. The call returns the output path."""
    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Path:
            bound = signature.bind(*args, **kwargs)
            final = Path(os.path.abspath(bound.arguments[param]))
            check_replaceable(final, marker)
            staging = final.parent / f".{final.name}.tmp"
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(staging)  # left by a writer that was killed
            bound.arguments[param] = staging
            try:
                fn(*bound.args, **bound.kwargs)
                staging.mkdir(exist_ok=True)
                swap_in(staging, final)
            except BaseException:
                _remove(staging)
                raise
            return final
        return run  # type: ignore[return-value]
    return wrap
