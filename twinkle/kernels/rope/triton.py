"""RoPE in Triton: one program per token rotates every head of q and of k in one launch.

The kernel walks q, k and the outputs through their strides, so HF's (B, H, T, D) views of
(B, T, H, D) projections are read in place, without copies. It reads both halves of cos and
sin, so any cos/sin are honoured, not only HF's duplicated cat(freqs, freqs). It is the torch op
``twinkle_triton::rope_rotate`` (fake kernel and autograd registered here, torch.compile keeps it
one node); its backward is the same op with the inverse (transposed) rotation, so only cos/sin
are saved, and cos/sin get no gradient. Loads are upcast to fp32 and results rounded once on store.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, OUT, stride_xh, stride_xd, stride_oh, stride_od, n_heads, head_dim, half,
                  cos1, cos2, sin1, sin2, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_PASS: tl.constexpr):
    """Rotates dims [0, 2*half) of the heads of one token; copies dims [2*half, head_dim)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_first = X + heads * stride_xh + dims * stride_xd
    out_first = OUT + heads * stride_oh + dims * stride_od
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + half * stride_xd, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_first, (x1 * cos1 - x2 * sin1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_first + half * stride_od, (x2 * cos2 + x1 * sin2).to(OUT.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        pass_dims = 2 * half + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = (heads < n_heads) & (pass_dims < head_dim)
        x = tl.load(X + heads * stride_xh + pass_dims * stride_xd, mask=pass_mask)
        tl.store(OUT + heads * stride_oh + pass_dims * stride_od, x.to(OUT.dtype.element_ty), mask=pass_mask)


@triton.jit
def _rope_kernel(Q, Q_OUT, K, K_OUT, COS, SIN,
                 stride_qb, stride_qt, stride_qh, stride_qd,
                 stride_qob, stride_qot, stride_qoh, stride_qod,
                 stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_kob, stride_kot, stride_koh, stride_kod,
                 stride_cb, stride_ct, seq_len, n_q_heads, n_k_heads, head_dim, half,
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr, INVERSE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dims_mask = dims < half
    cs_row = b * stride_cb + t * stride_ct + dims  # cos and sin share shape and strides
    cos1 = tl.load(COS + cs_row, mask=dims_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + cs_row + half, mask=dims_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + cs_row, mask=dims_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + cs_row + half, mask=dims_mask, other=0.0).to(tl.float32)
    if INVERSE:
        # y1 = c1*x1 - s1*x2, y2 = c2*x2 + s2*x1  =>  dx1 = c1*dy1 + s2*dy2, dx2 = c2*dy2 - s1*dy1:
        # the forward with the sine halves swapped and negated.
        sin1, sin2 = -sin2, -sin1
    _rotate_heads(Q + b * stride_qb + t * stride_qt, Q_OUT + b * stride_qob + t * stride_qot,
                  stride_qh, stride_qd, stride_qoh, stride_qod, n_q_heads, head_dim, half,
                  cos1, cos2, sin1, sin2, BLOCK_QH, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(K + b * stride_kb + t * stride_kt, K_OUT + b * stride_kob + t * stride_kot,
                  stride_kh, stride_kd, stride_koh, stride_kod, n_k_heads, head_dim, half,
                  cos1, cos2, sin1, sin2, BLOCK_KH, BLOCK_HALF, BLOCK_PASS)


def _block(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


@torch.library.custom_op('twinkle_triton::rope_rotate', mutates_args=())
def rope_rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
                inverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q and k in their layouts; ``inverse`` rotates back (what backward does to
    the gradients of q and k)."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    # (B, T, H, D) views whatever the layout: the kernel indexes token, head, dim by strides.
    views = [x.transpose(1, 2) if unsqueeze_dim == 1 else x for x in (q, q_out, k, k_out)]
    batch, seq_len, n_q_heads, head_dim = views[0].shape
    n_k_heads = views[2].shape[2]
    if batch * seq_len == 0:
        return q_out, k_out
    cos = cos.contiguous().expand(batch, seq_len, -1)  # broadcast dims get stride 0
    sin = sin.contiguous().expand(batch, seq_len, -1)
    rotary_dim = cos.shape[-1]
    block_qh, block_kh, block_half = _block(n_q_heads), _block(n_k_heads), _block(rotary_dim // 2)
    block_pass = triton.next_power_of_2(head_dim - rotary_dim) if head_dim > rotary_dim else 0
    tile = max(block_qh, block_kh) * max(block_half, block_pass)
    _rope_kernel[(batch * seq_len,)](
        *views, cos, sin, *(s for view in views for s in view.stride()), cos.stride(0), cos.stride(1),
        seq_len, n_q_heads, n_k_heads, head_dim, rotary_dim // 2,
        BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        INVERSE=inverse, num_warps=8 if tile >= 4096 else 4)
    return q_out, k_out


@rope_rotate.register_fake
def _rope_rotate_fake(q, k, cos, sin, unsqueeze_dim, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, unsqueeze_dim, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.inverse = unsqueeze_dim, inverse


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_rotate(dq, dk, cos, sin, ctx.unsqueeze_dim, not ctx.inverse)
    return dq, dk, None, None, None, None


rope_rotate.register_autograd(_backward, setup_context=_setup_context)


def rope(q, k, cos, sin, unsqueeze_dim):
    return rope_rotate(q, k, cos, sin, unsqueeze_dim, False)
