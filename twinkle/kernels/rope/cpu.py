"""RoPE on CPU through the C++ kernel of csrc/rope.cpp (vectorised, parallel over rows).

One torch op, ``twinkle_cpu::rope_rotate(x, cos, sin, inverse)``: the inverse rotation is the
transpose of the forward one, so the op's backward is the op itself with ``inverse`` flipped and
nothing but cos/sin is saved. cos/sin broadcast over the heads inside the kernel (never expanded
in memory) and get no gradient (HF builds them under no_grad).
"""
import torch

from .. import native

native.require()
_ops = torch.ops.twinkle_cpu


@torch.library.register_fake('twinkle_cpu::rope_rotate')
def _rope_rotate_fake(x, cos, sin, inverse):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return _ops.rope_rotate(grad, cos, sin, not ctx.inverse), None, None, None


torch.library.register_autograd('twinkle_cpu::rope_rotate', _backward, setup_context=_setup_context)


def rope(q, k, cos, sin, unsqueeze_dim):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _ops.rope_rotate(q, cos, sin, False), _ops.rope_rotate(k, cos, sin, False)
