"""Apple-silicon GPUs through Metal (MPS): bf16 since macOS 14, no Triton, no NCCL."""
from __future__ import annotations

import torch

from .base import Backend


class MpsBackend(Backend):
    type = 'mps'
    dist_backend = 'gloo'

    @classmethod
    def is_available(cls) -> bool:
        mps = getattr(torch.backends, 'mps', None)
        return bool(mps is not None and mps.is_available())

    @property
    def supports_bf16(self) -> bool:
        return True

    def default_dtype(self):
        # MPS kernels for bf16 training are incomplete; fp32 is the safe default.
        return torch.float32

    def peak_memory(self) -> int:
        return torch.mps.driver_allocated_memory()

    def reset_peak_memory(self) -> None:
        torch.mps.empty_cache()

    def synchronize(self) -> None:
        torch.mps.synchronize()
