"""Liger-Kernel's fused linear cross-entropy behind our signature, declared as the ops of
``chunked.define_ops`` (``twinkle_liger::fused_linear_cross_entropy_*``): liger's host functions run
inside them, so its ``autograd.Function`` (which keeps flags and gradients on ``ctx``) never reaches
autograd or torch.compile.

Liger chunks on its own (transient logits ~ N x H elements) and accumulates dW/db in fp32 (our
contract; for low-precision weights it hands them back rounded to the weight's dtype, which the op
widens to fp32 again). What it does not take from us:
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
from liger_kernel.ops import fused_linear_cross_entropy as liger_flce

from . import reference
from .chunked import Passes, define_ops


def _defers_unreduced_gradients(forward) -> bool:
    """Whether this liger recomputes the logits in backward for reduction='none' (its
    ``token_grad_output``, present in 0.8.5) instead of scaling a finished dW."""
    return 'token_grad_output' in inspect.signature(forward).parameters


def _liger_pass(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, wanted, **extra):
    """Liger's chunked pass: (loss, the ``wanted`` gradients as fp32 for weight and bias, else None)."""
    loss, _, _, _, d_hidden, d_weight, d_bias = liger_flce.fused_linear_cross_entropy_forward(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction, softcap=softcap, accum_dtype=torch.float32, compute_gradients=any(wanted),
        weight_requires_grad=wanted[1], **extra)
    grads = (d_hidden, None if d_weight is None else d_weight.float(), None if d_bias is None else d_bias.float())
    return loss, tuple(grad if want else None for grad, want in zip(grads, wanted))


def _forward(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size, wanted):
    if reduction == 'none':
        wanted = (False, False, False)  # backward recomputes, weighting each token
    return _liger_pass(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, wanted)


def _unreduced_backward(grad_loss, hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, chunk_size,
                        wanted):
    _, grads = _liger_pass(hidden, weight, labels, bias, ignore_index, 'none', label_smoothing, softcap, wanted,
                           token_grad_output=grad_loss)
    return grads


_liger_op = define_ops('twinkle_liger', Passes(_forward, _unreduced_backward))


def fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
                               chunk_size):
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
    return _liger_op(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size)
