"""RMSNorm as an nn.Module that can take over Hugging Face RMSNorm modules in place.

It keeps HF's attribute names (``weight``, ``variance_epsilon``), so ``kernelize`` can swap the
class of a loaded ``LlamaRMSNorm`` / ``Qwen3RMSNorm`` without touching its state dict.
"""
import torch
from torch import nn

from . import rms_norm


class TwinkleRMSNorm(nn.Module):
    # Class-level default so HF instances whose class is swapped to this one need no new field.
    offset = 0.0

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, offset: float = 0.0):
        super().__init__()
        init = torch.zeros if offset else torch.ones  # offset form stores weight - offset
        self.weight = nn.Parameter(init(hidden_size))
        self.variance_epsilon = eps
        self.offset = offset

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, offset=self.offset)

    def extra_repr(self) -> str:
        extra = f', offset={self.offset}' if self.offset else ''
        return f'{tuple(self.weight.shape)}, eps={self.variance_epsilon}{extra}'
