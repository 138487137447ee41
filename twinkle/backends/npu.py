"""Ascend NPUs through ``torch_npu``, imported only when detection asks for it.

``torch_npu`` registers the 'npu' device type with torch on import; importing it on a host
without the CANN toolkit can break torch, so we look for the package before importing it.
"""
from __future__ import annotations

from types import ModuleType

from .base import Backend, has_package


def torch_npu() -> ModuleType:
    """The ``torch_npu`` module, or a clear error naming the extra to install."""
    try:
        import torch_npu as module
    except ImportError as exc:
        raise ImportError('Ascend NPU support needs torch_npu: pip install "twinkle[npu]" '
                          '(and the CANN toolkit)') from exc
    return module


class NpuBackend(Backend):
    type = 'npu'
    dist_backend = 'hccl'

    @classmethod
    def is_available(cls) -> bool:
        if not has_package('torch_npu'):
            return False
        try:
            return bool(torch_npu().npu.is_available())
        except Exception:  # a broken CANN install must not stop CPU/GPU detection
            return False

    @property
    def device_name(self) -> str:
        return torch_npu().npu.get_device_name(self.local_index())

    @property
    def supports_bf16(self) -> bool:
        npu = torch_npu().npu
        probe = getattr(npu, 'is_bf16_supported', None)
        return bool(probe()) if probe is not None else True

    def device_count(self) -> int:
        return torch_npu().npu.device_count()

    def peak_memory(self) -> int:
        return torch_npu().npu.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch_npu().npu.reset_peak_memory_stats()

    def synchronize(self) -> None:
        torch_npu().npu.synchronize()
