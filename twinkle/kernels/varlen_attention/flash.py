"""Varlen attention with flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16).

The packed layout is flash-attn's own: no gather, no padding, GQA native.
"""
import torch

from . import sdpa


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                     causal: bool, scale: float, max_seqlen: int) -> torch.Tensor:
    if q.dtype not in sdpa.HALF_DTYPES:
        return sdpa.fallback('flash_attn', q, k, v, cu_seq_lens, causal, scale, max_seqlen)
    from flash_attn import flash_attn_varlen_func
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu_seq_lens, cu_seq_lens, max_seqlen, max_seqlen,
                                  softmax_scale=scale, causal=causal)
