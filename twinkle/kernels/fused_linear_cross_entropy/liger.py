"""Liger-Kernel's fused linear cross-entropy behind our signature.

Liger chunks on its own (transient logits ~ N x H elements) and accumulates dW/db in the dtype we
ask for (fp32 here, as our contract says). What it does not take from us:
- ``chunk_size``: it has no such knob (ValueError; use backend='triton' or 'cpu'),
- reduction='none' with gradients in liger releases without its deferred-gradient path (those
  scale dW after the sum over tokens, which is wrong: ValueError),
- N == 0: its chunk arithmetic divides by zero, so the empty case runs the reference (nothing
  to compute either way).
``logit_softcap`` maps to its ``softcap``; that path is not tested here because the Triton
interpreter cannot run liger's ``softcap.to(tl.float32)`` on a Python float.
"""
import inspect

import torch

from . import reference


def _defers_unreduced_gradients(forward) -> bool:
    """Whether this liger recomputes the logits in backward for reduction='none' (its
    ``token_grad_output``, present in 0.8.5) instead of scaling a finished dW."""
    return 'token_grad_output' in inspect.signature(forward).parameters


def fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
                               chunk_size):
    from liger_kernel.ops import fused_linear_cross_entropy as liger_flce

    if chunk_size is not None:
        raise ValueError('chunk_size: the liger backend chooses its own chunking; use backend="triton" or "cpu" '
                         'to set it')
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if reduction == 'none' and needs_grad and not _defers_unreduced_gradients(
            liger_flce.fused_linear_cross_entropy_forward):
        raise ValueError("reduction='none' with gradients needs liger-kernel with deferred per-token gradients; "
                         'upgrade liger-kernel or use backend="triton"')
    if hidden.shape[0] == 0:
        return reference.fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction,
                                                    label_smoothing, softcap, chunk_size)
    loss, *_ = liger_flce.LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, bias, None, ignore_index, 0.0, label_smoothing, reduction, softcap, False,
        torch.float32)
    return loss
