"""RoPE on Ascend through ``torch_npu.npu_rotary_mul`` (x * r1 + rotate_half(x) * r2, 'half'
mode), which torch_npu differentiates itself, cos/sin included.

It rotates the whole last dim of 4-D x with 4-D cos/sin in x's dtype: cos/sin are unsqueezed
like HF does (giving its B1SD / BS1D broadcast layouts) and, for partial rotary, only the first
D_rot dims go through it. The kernel rejects empty tensors, which take the reference path.
"""
import torch

from twinkle.backends.npu import torch_npu

from . import reference


def rope(q, k, cos, sin, unsqueeze_dim):
    if min(q.numel(), k.numel(), cos.numel()) == 0:
        return reference.rope(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x, cos, sin):
    rotary_dim = cos.shape[-1]
    rotated = torch_npu().npu_rotary_mul(x[..., :rotary_dim], cos.to(x.dtype), sin.to(x.dtype))
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
