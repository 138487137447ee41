"""Next-token cross-entropy, summed over the tokens that are not ignored."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .base import IGNORE_INDEX, Loss, next_token_targets


class CrossEntropyLoss(Loss):
    """Cross-entropy of next-token prediction.

    With twinkle's kernels on the model (``kernels='auto'``) the model computes it through fused
    linear cross-entropy and never builds the logits; without them it is computed here from the
    logits, in fp32.
    """

    model_computes_loss = True

    def __call__(self, inputs, outputs) -> Tuple[torch.Tensor, torch.Tensor]:
        targets = next_token_targets(inputs)
        num_tokens = (targets != IGNORE_INDEX).sum()
        loss = getattr(outputs, 'loss', None)
        if loss is None:
            logits = outputs.logits
            loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten().to(logits.device),
                                   ignore_index=IGNORE_INDEX, reduction='sum')
        return loss, num_tokens


class ChunkedCrossEntropyLoss(Loss):
    """Cross-entropy from the logits, token chunk by token chunk, recomputed in backward.

    For models whose logits exist anyway (no fused head): the fp32 upcast of the full
    (tokens, vocab) logits and its softmax are never held at once, only one chunk's.
    """

    def __init__(self, chunk_size: int = 1024):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}')
        self.chunk_size = chunk_size

    def __call__(self, inputs, outputs) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = outputs.logits.flatten(0, -2)
        targets = next_token_targets(inputs).flatten().to(logits.device)
        total: Optional[torch.Tensor] = None
        for start in range(0, logits.shape[0], self.chunk_size):
            chunk = checkpoint(_chunk_loss, logits[start:start + self.chunk_size],
                               targets[start:start + self.chunk_size], use_reentrant=False)
            total = chunk if total is None else total + chunk
        if total is None:
            total = logits.sum() * 0.0
        return total, (targets != IGNORE_INDEX).sum()


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction='sum')
