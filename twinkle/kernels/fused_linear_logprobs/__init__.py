"""Fused linear log-probs: each token's log-prob of its label (and the entropy) under the LM head,
never holding the N x V logits -- RL's log-probs at the memory of SFT's fused cross-entropy."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from twinkle.utils.labels import IGNORE_INDEX

from .. import registry
from ..checks import check_values, require_head_inputs, require_ids_in_range, require_int
from ..registry import Impl

OP = 'fused_linear_logprobs'
registry.register(OP, {'reference': 'reference', 'chunked': Impl('chunked'), 'triton': 'triton'},
                  priority={'cuda': ['triton', 'chunked', 'reference'], 'cpu': ['chunked', 'reference'],
                            registry.ANY_DEVICE: ['chunked', 'reference']})


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, return_entropy: bool = False,
                          chunk_size: Optional[int] = None, backend: Optional[str] = None
                          ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``log_softmax(hidden @ weight.T / temperature)`` at each token's label, and with
    ``return_entropy`` the entropy of that distribution, never holding all the logits.

    hidden (..., H), weight (V, H) of hidden's dtype, labels (...) integer in [0, V) or
    ``ignore_index``. Returns fp32 tensors of labels' shape, 0 at ignored tokens: ``logprobs``, or
    ``(logprobs, entropy)``. Both are differentiable w.r.t. hidden and weight. ``chunk_size``
    (tokens per chunk) overrides the backend's memory-bounded choice.
    """
    require_head_inputs(hidden, 'weight', weight, labels)
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                             and temperature > 0):
        raise ValueError(f'temperature must be a finite number > 0, got {temperature!r}')
    require_int('ignore_index', ignore_index)
    if not isinstance(return_entropy, bool):
        raise ValueError(f'return_entropy must be a bool, got {return_entropy!r}')
    if chunk_size is not None:
        require_int('chunk_size', chunk_size, low=1)
    flat_labels = labels.reshape(-1).long()
    if check_values():  # checked once per batch where it is built (checks.check_batch)
        require_ids_in_range('labels', flat_labels, weight.shape[0], ignore=ignore_index)
    logprobs, entropy = registry.resolve(OP, backend, hidden.device)(
        hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels, float(temperature), ignore_index, return_entropy,
        chunk_size)
    if return_entropy:
        return logprobs.view(labels.shape), entropy.view(labels.shape)
    return logprobs.view(labels.shape)


__all__ = ['fused_linear_logprobs']
