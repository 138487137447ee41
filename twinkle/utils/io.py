"""Writing checkpoints so that a crash never leaves a half-written directory behind."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a temporary sibling of ``path`` to write into; on success it replaces ``path``."""
    path = os.path.abspath(path)
    staging = f'{path}.tmp-{os.getpid()}'
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(path):
        retired = f'{path}.old-{os.getpid()}'
        os.replace(path, retired)
        os.replace(staging, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(staging, path)
