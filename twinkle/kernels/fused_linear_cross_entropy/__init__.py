"""Fused linear cross-entropy: the LM head and its loss without the N x V logits."""
from __future__ import annotations

import math
from typing import Optional

import torch

from twinkle.utils.labels import IGNORE_INDEX

from .. import registry
from ..checks import (check_values, require_head_inputs, require_ids_in_range, require_int, require_same_device,
                      require_size, require_tensor)
from .chunked import REDUCTIONS
from .vocab_parallel import vocab_parallel_fused_linear_cross_entropy

registry.register('fused_linear_cross_entropy', ['reference', 'cpu', 'triton', 'liger', 'npu'])


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: Optional[torch.Tensor] = None, ignore_index: int = IGNORE_INDEX,
                               reduction: str = 'mean', label_smoothing: float = 0.0,
                               logit_softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                               backend: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, never holding all the logits.

    hidden (..., H), weight (V, H), bias (V,), labels (...) integer in [0, V) or ``ignore_index``.
    ``label_smoothing`` follows ``F.cross_entropy``; ``logit_softcap`` caps the logits as
    ``softcap * tanh(logits / softcap)`` before the softmax (Gemma-2). 'mean' divides by the
    number of counted tokens (0 when none count); 'none' returns labels' shape with 0 at
    ignored tokens. The loss is fp32 whatever the input dtype. ``chunk_size`` (tokens per
    chunk) overrides the backend's memory-bounded choice.
    """
    require_head_inputs(hidden, 'weight', weight, labels)
    if bias is not None:
        require_tensor('bias', bias, floating=True, dims=(1,))
        require_size('bias', bias.shape[0], weight.shape[0], 'length equal to the vocabulary size (dim 0 of weight),')
    require_same_device('hidden', hidden, bias=bias)
    require_int('ignore_index', ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f'label_smoothing must be in [0, 1], got {label_smoothing}')
    if logit_softcap is not None and not (isinstance(logit_softcap, (int, float)) and logit_softcap > 0
                                          and math.isfinite(logit_softcap)):
        raise ValueError(f'logit_softcap must be None or a finite number > 0, got {logit_softcap}')
    if chunk_size is not None:
        require_int('chunk_size', chunk_size, low=1)
    flat_labels = labels.reshape(-1).long()
    if check_values():  # checked once per batch where it is built (checks.check_batch)
        require_ids_in_range('labels', flat_labels, weight.shape[0], ignore=ignore_index)
    loss = registry.resolve('fused_linear_cross_entropy', backend, hidden.device)(
        hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels, bias, ignore_index, reduction,
        float(label_smoothing), None if logit_softcap is None else float(logit_softcap), chunk_size)
    return loss.view(labels.shape) if reduction == 'none' else loss


__all__ = ['fused_linear_cross_entropy', 'vocab_parallel_fused_linear_cross_entropy']
