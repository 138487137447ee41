"""NVIDIA GPUs. Capabilities follow the compute capability: bf16 and flash-attn 2 need sm80+,
so T4 (7.5) and V100 (7.0) train in fp16 with SDPA."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import Backend, has_package


class CudaBackend(Backend):
    type = 'cuda'
    dist_backend = 'nccl'

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @property
    def torch_device_type(self) -> str:
        return 'cuda'

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.local_index())

    @property
    def compute_capability(self) -> Optional[Tuple[int, int]]:
        return tuple(torch.cuda.get_device_capability(self.local_index()))

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def has_flash_attn(self) -> bool:
        return self.compute_capability >= (8, 0) and has_package('flash_attn')

    @property
    def has_triton(self) -> bool:
        return self.compute_capability >= (7, 0) and has_package('triton')

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def synchronize(self) -> None:
        torch.cuda.synchronize()
