"""The device-family interface every backend implements.

A backend answers capability questions (bf16? flash-attn? triton?) once, from the device it sees,
so that kernels, mixed precision and distributed setup ask it instead of probing torch themselves.
The device layer imports nothing else of twinkle.
"""
from __future__ import annotations

import importlib.util
from typing import ClassVar, Optional, Tuple

import torch

from twinkle.utils.process_state import process_state


def has_package(name: str) -> bool:
    """True when ``name`` can be imported, without importing it (optional deps stay lazy)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class Backend:
    """One device family. Subclasses set ``type`` and ``dist_backend`` and override the probes."""

    type: ClassVar[str]
    dist_backend: ClassVar[str]

    @classmethod
    def is_available(cls) -> bool:
        """Whether this family is present on the host (used by detection)."""
        raise NotImplementedError

    # -- capabilities -----------------------------------------------------------------------
    @property
    def device_name(self) -> str:
        return self.type

    @property
    def compute_capability(self) -> Optional[Tuple[int, int]]:
        return None

    @property
    def supports_bf16(self) -> bool:
        return False

    @property
    def supports_fp16(self) -> bool:
        return True

    @property
    def has_flash_attn(self) -> bool:
        return False

    @property
    def has_triton(self) -> bool:
        return False

    def default_dtype(self) -> torch.dtype:
        """bf16 where the hardware has it, else fp16 (old GPUs), else fp32."""
        if self.supports_bf16:
            return torch.bfloat16
        if self.supports_fp16:
            return torch.float16
        return torch.float32

    # -- placement and memory ---------------------------------------------------------------
    def device_count(self) -> int:
        return 1

    def local_index(self) -> int:
        """This process's device index: LOCAL_RANK under torchrun (wrapped to the device count)."""
        return process_state().device_index() % max(self.device_count(), 1)

    def local_device(self) -> torch.device:
        return torch.device(self.torch_device_type, self.local_index())

    @property
    def torch_device_type(self) -> str:
        """The string torch uses for this family's tensors (PPU tensors are 'cuda')."""
        return self.type

    def peak_memory(self) -> int:
        """Peak bytes allocated since the last reset."""
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op where execution is synchronous)."""

    # -- process setup ----------------------------------------------------------------------
    def tune_process(self) -> dict:
        """Apply process-wide settings that make this family fast; returns what was set."""
        return {}

    def describe(self) -> dict:
        """The facts ``twinkle env`` prints."""
        return {
            'type': self.type,
            'device_name': self.device_name,
            'compute_capability': self.compute_capability,
            'supports_bf16': self.supports_bf16,
            'supports_fp16': self.supports_fp16,
            'has_flash_attn': self.has_flash_attn,
            'has_triton': self.has_triton,
            'dist_backend': self.dist_backend,
            'default_dtype': str(self.default_dtype()).replace('torch.', ''),
        }

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.device_name!r})'
