"""The library's logger: one handler on the ``twinkle`` logger, quiet on ranks other than 0.

Under torchrun every rank would otherwise print the same kernel choices; set
``TWINKLE_LOG_ALL_RANKS=1`` to see them all. ``TWINKLE_LOG_LEVEL`` sets the level (default INFO).
"""
from __future__ import annotations

import logging
import os

from .process_state import process_state

_ROOT = 'twinkle'
_configured = False
_LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')


class _RankZeroFilter(logging.Filter):
    """Passes records on rank 0 only (RANK read per record: it is set by torchrun before we run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get('TWINKLE_LOG_ALL_RANKS', '0') == '1':
            return True
        return process_state().global_rank() == 0


def _configure_root() -> None:
    global _configured
    if _configured:
        return
    root = logging.getLogger(_ROOT)
    handler = logging.StreamHandler()
    rank = os.environ.get('RANK')
    prefix = f'[rank{rank}] ' if rank is not None else ''
    handler.setFormatter(logging.Formatter(f'{prefix}[twinkle %(levelname)s] %(message)s'))
    handler.addFilter(_RankZeroFilter())
    root.addHandler(handler)
    level = os.environ.get('TWINKLE_LOG_LEVEL', 'INFO').upper()
    if level not in _LEVELS:  # a typo must not stop the import of twinkle (nor `twinkle env`)
        root.setLevel(logging.INFO)
        root.propagate = False
        root.warning('TWINKLE_LOG_LEVEL=%r is not a level (valid: %s): using INFO', level, ', '.join(_LEVELS))
    else:
        root.setLevel(level)
    root.propagate = False
    _configured = True


def get_logger(name: str = _ROOT) -> logging.Logger:
    """A logger under the ``twinkle`` hierarchy (``twinkle.get_logger(__name__)``)."""
    _configure_root()
    if name != _ROOT and not name.startswith(_ROOT + '.'):
        name = f'{_ROOT}.{name}'
    return logging.getLogger(name)
