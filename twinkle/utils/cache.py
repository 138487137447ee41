"""The on-disk cache (tiny-model assets, built C++ extensions): one builder at a time, nothing half-built.

Every cached directory is complete or absent. A builder holds an exclusive file lock (an ``flock``, which
dies with its holder, so a killed builder never blocks the next one) for a bounded time, writes into a
staging directory or its own build directory, and records a manifest of every file's size and SHA-256
*last*. A directory without a manifest, or whose files no longer match it, was left by a killed or
broken builder (or was damaged since): it is rebuilt with a logged warning, never used.

The root is ``$TWINKLE_CACHE``, else ``$XDG_CACHE_HOME/twinkle``, else ``~/.cache/twinkle``; entries are
created readable by every user (a cache shared between accounts works), writable by their owner.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

from .logger import get_logger

logger = get_logger(__name__)

MANIFEST = '.twinkle-manifest.json'
LOCK_TIMEOUT_ENV = 'TWINKLE_CACHE_LOCK_TIMEOUT'
DEFAULT_LOCK_TIMEOUT = 900.0  # seconds: a first C++ build on a loaded 2-core machine takes a few minutes
_verified: Dict[str, float] = {}  # directory -> manifest mtime, hashed once per process


class CacheLockTimeout(TimeoutError):
    """Another process held a cache entry's build lock for longer than the stated timeout."""


def cache_root() -> Path:
    """The cache root, created if missing; a clear error when it cannot be written."""
    if os.environ.get('TWINKLE_CACHE'):
        root = Path(os.environ['TWINKLE_CACHE'])
    elif os.environ.get('XDG_CACHE_HOME'):
        root = Path(os.environ['XDG_CACHE_HOME']) / 'twinkle'
    else:
        root = Path.home() / '.cache' / 'twinkle'
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise PermissionError(f'twinkle cannot write its cache at {root} ({error.strerror or error}); '
                              'set TWINKLE_CACHE to a writable directory') from error
    return root


def entry(*parts: str) -> Path:
    """A path under the cache root (the directory itself is not created)."""
    return cache_root().joinpath(*parts)


def lock_timeout() -> float:
    value = os.environ.get(LOCK_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_LOCK_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float('nan')
    if not 0 < seconds < float('inf'):
        raise ValueError(f'{LOCK_TIMEOUT_ENV} must be a positive number of seconds, got {value!r}')
    return seconds


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold ``lock_path``'s flock; waiting longer than ``timeout`` seconds raises ``CacheLockTimeout``."""
    timeout = lock_timeout() if timeout is None else timeout
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, 'a') as handle:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not announced:
                logger.info('waiting for another process building %s (lock %s, up to %.0f s)', what, lock_path,
                            timeout)
                announced = True
            if time.monotonic() > deadline:
                raise CacheLockTimeout(f'waited {timeout:.0f} s for another process building {what} (it holds '
                                       f'{lock_path}); if no build is running, remove that file, or raise '
                                       f'{LOCK_TIMEOUT_ENV}')
            time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_manifest(directory: Path, only: Optional[Callable[[str], bool]] = None) -> None:
    """Record the size and hash of every file (or those ``only`` accepts); written last and atomically:
    its presence means complete."""
    files = {}
    for path in sorted(directory.rglob('*')):
        name = str(path.relative_to(directory))
        if path.is_file() and not name.startswith(MANIFEST) and (only is None or only(name)):
            files[name] = {'size': path.stat().st_size, 'sha256': _sha256(path)}
    staging = directory / f'{MANIFEST}.tmp'
    staging.write_text(json.dumps({'files': files}, indent=1, sort_keys=True))
    os.replace(staging, directory / MANIFEST)


def verify_manifest(directory: Path, only: Optional[Callable[[str], bool]] = None) -> Optional[str]:
    """None when ``directory`` holds every file of its manifest with the recorded size and hash, else why not.

    Sizes are checked on every call, hashes once per process (per manifest version). ``only`` limits the
    check to the files whose relative path it accepts.
    """
    manifest = directory / MANIFEST
    try:
        files = json.loads(manifest.read_text())['files']
    except FileNotFoundError:
        return f'no {MANIFEST} (a build that did not finish)'
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f'unreadable {MANIFEST} ({error})'
    selected = {name: meta for name, meta in files.items() if only is None or only(name)}
    if not selected:
        return f'{MANIFEST} lists none of the expected files'
    for name, meta in selected.items():
        path = directory / name
        if not path.is_file():
            return f'{name} is missing'
        if path.stat().st_size != meta['size']:
            return f'{name} has {path.stat().st_size} bytes, the manifest says {meta["size"]}'
    stamp = manifest.stat().st_mtime
    if _verified.get(str(directory)) != stamp:
        for name, meta in selected.items():
            if _sha256(directory / name) != meta['sha256']:
                return f'{name} does not match its recorded SHA-256'
        _verified[str(directory)] = stamp
    return None


def materialise(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """``target``, complete: built by ``build(staging)`` under the lock if it is missing or broken.

    ``build`` writes files into a fresh staging directory on this process (never only on some rank);
    the manifest is written after it returns, then the staging directory is renamed into place.
    """
    if verify_manifest(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / f'.{target.name}.lock', what):
        problem = verify_manifest(target)  # a builder we waited for may have finished it
        if problem is None:
            return target
        if target.exists():
            logger.warning('cached %s at %s is broken (%s): rebuilding it', what, target, problem)
            retire(target)
        logger.info('building %s into %s (first use)', what, target)
        staging = Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
        try:
            build(staging)
            write_manifest(staging)
            make_shareable(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def retire(path: Path) -> None:
    """Remove a broken entry: renamed aside first, so no reader ever sees it half-deleted."""
    aside = path.with_name(f'.{path.name}.broken-{os.getpid()}')
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def make_shareable(directory: Path) -> None:
    """Directories 0755, files 0644 (``mkdtemp`` creates 0700): other users of a shared cache can read."""
    for path in [directory, *directory.rglob('*')]:
        with contextlib.suppress(OSError):
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
