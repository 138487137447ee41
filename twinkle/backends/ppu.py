"""CUDA-compatible accelerators (PPU) that speak the CUDA runtime API but are not NVIDIA GPUs.

They are found through ``torch.cuda`` and told apart by the device name. Their tensors are
'cuda' tensors and they use NCCL-compatible collectives; Triton and flash-attn builds are not
assumed, so kernels fall back to the portable paths unless the user forces another one.
"""
from __future__ import annotations

import torch

from .cuda import CudaBackend

# Substrings of torch.cuda.get_device_name() that identify a PPU.
PPU_NAME_MARKERS = ('PPU',)


def is_ppu_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in PPU_NAME_MARKERS)


class PpuBackend(CudaBackend):
    type = 'ppu'
    dist_backend = 'nccl'

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available() and is_ppu_name(torch.cuda.get_device_name(0))

    @property
    def supports_bf16(self) -> bool:
        return True

    @property
    def has_flash_attn(self) -> bool:
        return False

    @property
    def has_triton(self) -> bool:
        return False
