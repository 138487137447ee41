"""RoPE through Liger-Kernel's rope kernel.

Liger rotates in place in a (B, T, H, D) buffer, in forward and in backward. When q (or an
incoming gradient) already has that layout - HF's q is such a view of its projection - the
buffer would be the caller's tensor, or a gradient autograd shares with another input. So this
Function hands Liger private copies in that layout: one copy per pass. Liger also reads only
the first half of cos/sin (HF's duplicated cat(freqs, freqs) layout) and computes in cos's
dtype, so cos/sin are upcast to fp32 here. Empty inputs take the reference path.
"""
import torch
from liger_kernel.ops.rope import rope_backward, rope_forward

from . import reference


def _heads_first(x, unsqueeze_dim):
    """(B, H, T, D), the layout Liger's host functions take."""
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


def _private_buffer(x):
    """A copy of (B, H, T, D) ``x`` whose storage is (B, T, H, D), so Liger works in place on it."""
    return x.transpose(1, 2).clone(memory_format=torch.contiguous_format).transpose(1, 2)


class LigerRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        q, k = _heads_first(q, unsqueeze_dim), _heads_first(k, unsqueeze_dim)
        seq_len = q.shape[2]
        cos = cos.float().expand(-1, seq_len, -1)
        sin = sin.float().expand(-1, seq_len, -1)
        q_out, k_out, cos, sin = rope_forward(_private_buffer(q), _private_buffer(k), cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _heads_first(q_out, unsqueeze_dim), _heads_first(k_out, unsqueeze_dim)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = (_private_buffer(_heads_first(g, ctx.unsqueeze_dim)) for g in (dq, dk))
        dq, dk = rope_backward(dq, dk, cos, sin)
        return _heads_first(dq, ctx.unsqueeze_dim), _heads_first(dk, ctx.unsqueeze_dim), None, None, None


def rope(q, k, cos, sin, unsqueeze_dim):
    if min(q.numel(), k.numel(), cos.numel()) == 0:
        return reference.rope(q, k, cos, sin, unsqueeze_dim)
    return LigerRopeFunction.apply(q, k, cos, sin, unsqueeze_dim)
