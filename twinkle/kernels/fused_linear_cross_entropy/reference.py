"""Fused linear cross-entropy in plain PyTorch: the oracle of the tests and the fallback everywhere.

It materialises the N x V logits in fp32 (that is what the other backends avoid) and leaves the
cross-entropy to ``F.cross_entropy``; ``chunk_size`` has nothing to chunk here. Registered as the
op ``twinkle_ref::fused_linear_cross_entropy`` (autograd by recompute, see ``kernels/library.py``).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..library import reference_op


def _fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                bias: Optional[torch.Tensor], ignore_index: int, reduction: str,
                                label_smoothing: float, softcap: Optional[float],
                                chunk_size: Optional[int]) -> torch.Tensor:
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction='none',
                             label_smoothing=label_smoothing)
    if reduction == 'none':
        return losses
    if reduction == 'sum':
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum().clamp(min=1)  # all ignored: 0, not 0/0


fused_linear_cross_entropy = reference_op('fused_linear_cross_entropy', _fused_linear_cross_entropy)
