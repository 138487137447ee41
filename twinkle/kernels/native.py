"""Builds and loads the C++ CPU kernels of ``csrc/`` (the 'cpu' backend of several ops) on first use.

The extension registers torch ops under ``torch.ops.twinkle_cpu``; each op's ``cpu.py`` adds their
fake kernels and autograd. It is compiled once per torch version, CPU vector ISA and source
contents into ``$TWINKLE_CACHE/extensions/<torch version>-<isa>-<hash>`` (``twinkle.utils.cache``),
then loaded from there. One process builds at a time (the others wait, within a bounded time); the
library is recorded in a manifest after it loaded, and a library without one (a build killed
mid-link) is rebuilt, never loaded. A missing compiler or a failed build is not an error:
``cpu_check`` returns the reason and the registry falls back.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, List, Optional

import torch

from twinkle.utils import cache
from twinkle.utils.logger import get_logger

from .registry import Impl

logger = get_logger(__name__)

EXTENSION_NAME = 'twinkle_cpu_kernels'
SOURCE_DIR = Path(__file__).resolve().parents[1] / '_csrc'  # in a checkout a link to the top-level csrc/
ERROR_LOG = 'build-error.log'
LIBRARY = f'{EXTENSION_NAME}.so'
LOCK = 'build.flock'

# Flags for ATen's Vectorized<T> per ISA torch itself dispatches to (as torch.compile's C++ code uses).
_ISA_FLAGS = {
    'AVX512': ['-mavx512f', '-mavx512dq', '-mavx512vl', '-mavx512bw', '-mfma', '-DCPU_CAPABILITY_AVX512'],
    'AVX2': ['-mavx2', '-mfma', '-mf16c', '-DCPU_CAPABILITY_AVX2'],
}

_state: dict = {}  # 'error': None once loaded, else why the kernels cannot run (kept for the process)


def cpu_check(target=None) -> Optional[str]:
    """Registry capability check of every 'cpu' backend: builds/loads the extension on the first
    call; returns None when the ops are loaded, else why not (decided once per process)."""
    if 'error' not in _state:
        _state['error'] = _build_and_load()
    return _state['error']


def require() -> None:
    """Load the extension or raise (for the backend modules, imported after the check passed)."""
    error = cpu_check()
    if error is not None:
        raise RuntimeError(f'twinkle native CPU kernels unavailable: {error}')


def build_directory() -> Path:
    """Where this torch/ISA/source combination is built and cached."""
    digest = hashlib.sha256()
    for path in _source_files():
        digest.update(path.name.encode() + b'\0' + path.read_bytes() + b'\0')
    digest.update(' '.join(_cflags() + [_compiler()]).encode())
    isa = torch.backends.cpu.get_cpu_capability().lower()
    return cache.entry('extensions', f'{torch.__version__}-{isa}-{digest.hexdigest()[:16]}')


def _compiler() -> str:
    return os.environ.get('CXX', 'c++')  # what torch.utils.cpp_extension compiles with


def _source_files() -> List[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in ('.cpp', '.h'))


def _cflags() -> List[str]:
    return ['-O3', '-fopenmp', *_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def _build_and_load() -> Optional[str]:
    from torch.utils import cpp_extension

    if not SOURCE_DIR.is_dir():
        return f'C++ sources not found at {SOURCE_DIR} (a broken install: reinstall twinkle)'
    if shutil.which(_compiler()) is None:
        return f'no C++ compiler {_compiler()!r} on PATH (install g++, or set CXX)'
    if not cpp_extension.is_ninja_available():
        return 'the build needs ninja: pip install ninja'
    try:
        directory = build_directory()
    except PermissionError as error:  # an unwritable cache: say so, fall back
        return str(error)
    try:
        with _exclusive_build(directory):
            started = time.perf_counter()
            built = _complete_build(directory)  # by us earlier, or by the rank we waited for
            if not built:
                logger.info('building the native CPU kernels into %s (once; takes about a minute)', directory)
            cpp_extension.load(name=EXTENSION_NAME, sources=[str(p) for p in _source_files() if p.suffix == '.cpp'],
                               extra_cflags=_cflags(), extra_ldflags=['-fopenmp'], build_directory=str(directory),
                               is_python_module=False, verbose=False)
            if not built:
                cache.write_manifest(directory, only=lambda name: name == LIBRARY)
    except cache.CacheLockTimeout as error:
        return str(error)
    except Exception as error:  # noqa: BLE001  (any build or load failure means: fall back)
        log = directory / ERROR_LOG
        with contextlib.suppress(OSError):
            log.write_text(str(error))
        return f'native CPU kernels failed to build or load ({_summary(error)}); details in {log}'
    if not built:
        logger.info('built the native CPU kernels in %.0f s', time.perf_counter() - started)
    return None


def _summary(error: Exception) -> str:
    """The line of a failure worth a log line: the compiler's first error, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return next((line for line in lines if ': error:' in line or ': fatal error:' in line), lines[0])[:300]


def _complete_build(directory: Path) -> bool:
    """Whether ``directory`` holds a finished build; leftovers of an unfinished one are removed."""
    problem = cache.verify_manifest(directory, only=lambda name: name == LIBRARY)
    if problem is None:
        return True
    if (directory / LIBRARY).exists():
        logger.warning('the native CPU kernels in %s are incomplete (%s): rebuilding them', directory, problem)
        for path in directory.iterdir():
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return False


@contextlib.contextmanager
def _exclusive_build(directory: Path) -> Iterator[None]:
    """One builder at a time across processes (torchrun ranks share the cache), waiting a bounded time.

    cpp_extension's own baton (a ``lock`` file in the build directory) already makes other
    processes wait, but a builder killed mid-build leaves that file behind and everyone then waits
    forever. An flock dies with its holder, so while we hold it a leftover baton can only be stale.
    """
    with cache.exclusive(directory / LOCK, f'the native CPU kernels in {directory}'):
        (directory / 'lock').unlink(missing_ok=True)
        yield


# The registry declaration of every backend built on these kernels.
NATIVE_CPU = Impl('cpu', devices=('cpu',), check=cpu_check)
