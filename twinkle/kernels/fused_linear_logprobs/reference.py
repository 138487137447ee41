"""Fused linear log-probs in plain PyTorch: the oracle of the tests and the fallback everywhere.

It materialises the N x V logits ``hidden @ weight.T / temperature`` in fp32 (what the other
backends avoid), takes ``log_softmax`` and gathers each token's label; the entropy is
``-sum(p * log p)`` of the same rows. ``chunk_size`` has nothing to chunk here. Registered as the
op ``twinkle_ref::fused_linear_logprobs`` (autograd by recompute, see ``kernels/library.py``).
"""
from typing import Optional, Tuple

import torch

from ..library import reference_op


def _fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                           ignore_index: int, return_entropy: bool,
                           chunk_size: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    valid = labels != ignore_index
    log_probs = torch.log_softmax(hidden.float() @ weight.float().t() / temperature, dim=-1)
    chosen = log_probs.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    logprobs = torch.where(valid, chosen, 0.0)
    if not return_entropy:
        return logprobs, logprobs.new_empty(0)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, torch.where(valid, entropy, 0.0)


fused_linear_logprobs = reference_op('fused_linear_logprobs', _fused_linear_logprobs)
