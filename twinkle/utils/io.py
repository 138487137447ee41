"""Writing checkpoints so that a crash never loses the previous one or leaves a half-written one.

A save writes everything new into a staging directory next to the target (``<path>.tmp-<pid>``)
and then commits it in one step:

- On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the staging directory and the previous checkpoint
  in one system call: at every instant ``path`` is either the whole previous checkpoint or the
  whole new one. The previous one, now under the staging name, is deleted afterwards.
- Where the kernel or filesystem cannot exchange (other systems, some network filesystems), the
  previous checkpoint is renamed to ``<path>.old-<pid>`` and the staging directory into place. A
  crash between those two renames leaves no ``path``; ``recover`` (run by every save and by
  ``twinkle`` loads) renames the retired checkpoint back: it is complete, it was the committed one.

What a crash leaves behind (a staging directory, a retired checkpoint) is removed by the next save
to the same path. Leftovers of processes that are still alive on this host are left alone, so two
jobs saving next to each other do not delete each other's work. This guards against a process
dying (SIGKILL, OOM, a node's job being cancelled); it does not fsync file contents, so a power loss
can still lose data the OS had not written yet.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
from typing import Iterator, List, Optional

from twinkle.utils.logger import get_logger

logger = get_logger(__name__)

STAGING = '.tmp-'  # <path>.tmp-<pid>: a save in progress (or killed)
RETIRED = '.old-'  # <path>.old-<pid>: the previous checkpoint during a two-rename commit
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV}


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields an empty staging directory to write the checkpoint into; on success it becomes
    ``path`` in one atomic step. On an exception the staging directory is removed and ``path``
    is untouched."""
    path = os.path.abspath(path)
    recover(path)
    staging = f'{path}{STAGING}{os.getpid()}'
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit(staging, path)


def commit(staging: str, path: str) -> None:
    """Make the complete directory ``staging`` the checkpoint at ``path``."""
    if not os.path.exists(path):
        os.replace(staging, path)
    elif _exchange(staging, path):
        shutil.rmtree(staging)  # now holds the previous checkpoint
    else:
        retired = f'{path}{RETIRED}{os.getpid()}'
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired)
    _sync_directory(os.path.dirname(path))


def recover(path: str) -> None:
    """Undo what an interrupted save left next to ``path``: restore a retired previous checkpoint
    when ``path`` is missing, and delete staging directories of processes that are gone."""
    path = os.path.abspath(path)
    retired = _leftovers(path, RETIRED)
    if not os.path.exists(path) and retired:
        previous = retired.pop()
        os.replace(previous, path)
        logger.warning('%s: a save was interrupted while replacing this checkpoint; restored the previous '
                       'one from %s', path, os.path.basename(previous))
    for leftover in retired + _leftovers(path, STAGING):
        logger.info('removing %s, left by an interrupted save', leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _leftovers(path: str, marker: str) -> List[str]:
    """Directories ``<path><marker><pid>`` whose process is not alive (newest last)."""
    found = []
    for candidate in glob.glob(glob.escape(path + marker) + '*'):
        pid = _pid_of(candidate[len(path + marker):])
        if pid is not None and os.path.isdir(candidate) and not _alive(pid):
            found.append(candidate)
    return sorted(found, key=os.path.getmtime)


def _pid_of(text: str) -> Optional[int]:
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of ours is from an earlier, failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _exchange(first: str, second: str) -> bool:
    """Atomically swap two directories (Linux renameat2); False where that is not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), second)


def _sync_directory(directory: str) -> None:
    """Persist the rename itself (the directory entry), where the OS allows opening a directory."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
