"""Host CPUs: the fallback everywhere, and a first-class target for tests and small runs.

Two process settings matter on CPU and are owned here (``tune_process``):
- ``THP_MEM_ALLOC_ENABLE=1`` makes PyTorch's CPU allocator back large tensors with transparent
  huge pages, which cuts page-fault cost of fresh activations several-fold. PyTorch reads it
  on the first large allocation, so it must be set before that.
- intra-op threads: one per core this process may use, divided among local torchrun ranks.
Settings the user made (environment variables) are left alone; ``TWINKLE_CPU_TUNING=0`` skips all.
"""
from __future__ import annotations

import os

import torch

from .base import Backend

_PROC_STATUS = '/proc/self/status'
_PROC_CLEAR_REFS = '/proc/self/clear_refs'
_applied: dict = {}
_CPU_DTYPES = {'fp32': torch.float32, 'float32': torch.float32, 'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CpuBackend(Backend):
    type = 'cpu'
    dist_backend = 'gloo'

    @classmethod
    def is_available(cls) -> bool:
        return True

    @property
    def device_name(self) -> str:
        return f'cpu ({torch.backends.cpu.get_cpu_capability()}, {usable_cores()} cores)'

    @property
    def supports_bf16(self) -> bool:
        return True

    def default_dtype(self) -> torch.dtype:
        """fp32: CPU bf16 is only fast with AMX/AVX512-BF16; ask with TWINKLE_CPU_DTYPE=bf16."""
        asked = os.environ.get('TWINKLE_CPU_DTYPE', 'fp32').lower()
        if asked not in _CPU_DTYPES:
            raise ValueError(f'TWINKLE_CPU_DTYPE={asked!r} is not a CPU training dtype; valid: '
                             f'{", ".join(_CPU_DTYPES)} (unset it for fp32)')
        return _CPU_DTYPES[asked]

    def local_device(self) -> torch.device:
        return torch.device('cpu')

    def peak_memory(self) -> int:
        """The process's resident-set high-water mark (VmHWM), in bytes: it sees torch's allocations."""
        with open(_PROC_STATUS) as status:
            for line in status:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f'VmHWM not found in {_PROC_STATUS}')

    def reset_peak_memory(self) -> None:
        """Reset VmHWM to the current RSS (Linux: write '5' to /proc/self/clear_refs)."""
        with open(_PROC_CLEAR_REFS, 'w') as clear_refs:
            clear_refs.write('5')

    def tune_process(self) -> dict:
        switch = os.environ.get('TWINKLE_CPU_TUNING', '1')
        if switch not in ('0', '1'):
            raise ValueError(f'TWINKLE_CPU_TUNING={switch!r}: use 1 (tune, the default) or 0 (leave the process alone)')
        if switch == '0':
            return {}
        if not _applied:
            _applied.update(_tune())
        return dict(_applied)


def applied_tuning() -> dict:
    """What ``tune_process`` set in this process (for ``twinkle env`` and summaries)."""
    return dict(_applied)


def _tune() -> dict:
    from twinkle.utils.logger import get_logger
    logger = get_logger(__name__)
    applied = {}
    if 'THP_MEM_ALLOC_ENABLE' not in os.environ:
        os.environ['THP_MEM_ALLOC_ENABLE'] = '1'
        applied['THP_MEM_ALLOC_ENABLE'] = '1'
    if 'OMP_NUM_THREADS' not in os.environ:
        local_ranks = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        threads = max(1, usable_cores() // local_ranks)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        applied['intra_op_threads'] = threads
    if applied:
        logger.info('CPU tuning applied: %s (TWINKLE_CPU_TUNING=0 turns it off; '
                    'variables you set are kept)', applied)
    return applied
