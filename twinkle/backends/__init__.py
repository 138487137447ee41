"""Device layer: which family this process runs on and what it can do.

``current()`` detects once per process (NPU, then PPU, then CUDA, then MPS, then CPU);
``TWINKLE_DEVICE=<type>`` overrides detection. A CPU-only host reports 'cpu'.
"""
from __future__ import annotations

import os
from typing import Dict, Type

from twinkle.utils.process_state import process_state

from .base import Backend, has_package
from .cpu import CpuBackend
from .cuda import CudaBackend
from .mps import MpsBackend
from .npu import NpuBackend
from .ppu import PpuBackend

# Detection order: the specific before the general (a PPU also answers torch.cuda).
FAMILIES: Dict[str, Type[Backend]] = {
    'npu': NpuBackend,
    'ppu': PpuBackend,
    'cuda': CudaBackend,
    'mps': MpsBackend,
    'cpu': CpuBackend,
}

_MISSING = {  # what a forced family needs, for the error when it is absent
    'cuda': 'torch.cuda.is_available() is False: no NVIDIA GPU or driver, or a CPU-only torch build',
    'ppu': 'torch.cuda sees no PPU device',
    'npu': 'needs torch_npu (pip install "twinkle[npu]") and an Ascend NPU with CANN',
    'mps': 'torch.backends.mps.is_available() is False: needs Apple silicon and a macOS torch build',
}


def detect() -> Backend:
    """Detect the device family now (no cache). Honours ``TWINKLE_DEVICE``."""
    forced = os.environ.get('TWINKLE_DEVICE')
    if forced:
        if forced not in FAMILIES:
            raise ValueError(f'TWINKLE_DEVICE={forced!r} is not a device family; '
                             f'valid: {", ".join(FAMILIES)}')
        family = FAMILIES[forced]
        if not family.is_available():  # else torch fails later, deep inside, with an AssertionError
            raise RuntimeError(f'TWINKLE_DEVICE={forced!r} but this host has no usable {forced} device '
                               f'({_MISSING.get(forced, "not detected")}); unset TWINKLE_DEVICE to detect the device, '
                               f'or set TWINKLE_DEVICE=cpu')
        return family()
    for family in FAMILIES.values():
        if family.is_available():
            return family()
    return CpuBackend()


def current() -> Backend:
    """The active device backend, detected on first use (then kept in the process state) and its
    process tuning applied."""
    state = process_state()
    if state.backend is None:
        state.backend = detect()
        from twinkle.utils.logger import get_logger
        get_logger(__name__).info('device: %s (%s)', state.backend.type, _reason(state.backend))
        state.backend.tune_process()
    return state.backend


def get(device_type: str) -> Backend:
    """The backend for a tensor's device type ('cuda' tensors on a PPU host belong to the PPU)."""
    active = current()
    if device_type == active.torch_device_type or device_type == active.type:
        return active
    if device_type not in FAMILIES:
        raise ValueError(f'unknown device type {device_type!r}; valid: {", ".join(FAMILIES)}')
    return FAMILIES[device_type]()


def reset() -> None:
    """Forget the detected backend (tests, or after changing TWINKLE_DEVICE)."""
    process_state().backend = None


def _reason(backend: Backend) -> str:
    if os.environ.get('TWINKLE_DEVICE'):
        return 'forced by TWINKLE_DEVICE'
    if backend.type == 'cpu':
        return 'no accelerator found'
    return f'detected {backend.device_name}'


__all__ = ['Backend', 'CpuBackend', 'CudaBackend', 'MpsBackend', 'NpuBackend', 'PpuBackend',
           'FAMILIES', 'current', 'detect', 'get', 'has_package', 'reset']
