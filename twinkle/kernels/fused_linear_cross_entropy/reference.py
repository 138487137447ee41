"""Fused linear cross-entropy in plain PyTorch: the oracle of the tests and the fallback everywhere.

It materialises the N x V logits in fp32 (that is what the other backends avoid) and leaves the
cross-entropy to ``F.cross_entropy``; ``chunk_size`` has nothing to chunk here.
"""
import torch
import torch.nn.functional as F


def fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
                               chunk_size):
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
