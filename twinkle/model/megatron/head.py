"""The LM head's loss without logits: twinkle's vocab-parallel fused linear cross-entropy in place
of Megatron's output layer + ``vocab_parallel_cross_entropy``.

``FusedHead`` takes over ``GPTModel.output_layer``. While ``fused`` is on, it returns the hidden
states (gathered over the sequence-parallel ranks) instead of the logits, so GPTModel hands them
out as its output, and ``loss_sum`` runs the head and the loss chunk by chunk over the vocab
shards: no rank ever holds a tokens x vocab tensor. Off (``forward_only``, or ``kernels=None``) it
is the output layer again.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from twinkle.utils.labels import IGNORE_INDEX, shifted_labels


class FusedHead(nn.Module):
    def __init__(self, output_layer: nn.Module, *, sequence_parallel: bool):
        super().__init__()
        self.base_layer = output_layer
        self.sequence_parallel = sequence_parallel
        self.fused = False
        self.head_weight: Optional[torch.Tensor] = None  # the weight of the last fused call (tied or own)

    @property
    def weight(self) -> torch.Tensor:
        """GPTModel reads ``output_layer.weight`` (the tied embedding on a last stage)."""
        return self.base_layer.weight

    def forward(self, hidden: torch.Tensor, weight: Optional[torch.Tensor] = None, **kwargs):
        if not self.fused:
            return self.base_layer(hidden, weight=weight, **kwargs)
        from megatron.core import tensor_parallel
        self.head_weight = self.base_layer.weight if weight is None else weight
        if self.sequence_parallel:  # backward reduce-scatters: it sums the ranks' partial hidden gradients
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        return hidden, None


def loss_sum(head: FusedHead, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Next-token cross-entropy summed over the trained tokens, from GPTModel's fused output [b, s, h]."""
    from megatron.core import parallel_state

    from twinkle.kernels.fused_linear_cross_entropy import vocab_parallel_fused_linear_cross_entropy
    weight = head.head_weight
    return vocab_parallel_fused_linear_cross_entropy(
        hidden, weight, shifted_labels(labels), group=parallel_state.get_tensor_model_parallel_group(),
        vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0], vocab_size=vocab_size,
        ignore_index=IGNORE_INDEX, reduction='sum', reduce_grad_hidden=not head.sequence_parallel)
