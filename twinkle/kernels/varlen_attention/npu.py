"""Varlen attention on Ascend NPUs: ``torch_npu.npu_fusion_attention`` in its TND layout.

TND is the packed (tokens, heads, dim) layout with per-sequence ends in ``actual_seq_qlen`` /
``actual_seq_kvlen``. Causal attention uses ``sparse_mode=3`` (right-down causal), which takes a
fixed 2048x2048 upper-triangular mask whatever the sequence lengths. fp16/bf16 only.
"""
import functools

import torch

from . import sdpa

_CAUSAL_MASK_SIZE = 2048


@functools.lru_cache(maxsize=None)
def _causal_mask(device: torch.device) -> torch.Tensor:
    size = _CAUSAL_MASK_SIZE
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(diagonal=1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                     causal: bool, scale: float, max_seqlen: int) -> torch.Tensor:
    if q.dtype not in sdpa.HALF_DTYPES:
        return sdpa.fallback('npu', q, k, v, cu_seq_lens, causal, scale, max_seqlen)
    import torch_npu
    # npu_fusion_attention takes the sequence ends as a host list: one read of cu_seq_lens per call.
    ends = [end for end in dict.fromkeys(cu_seq_lens[1:].tolist()) if end > 0]  # empty sequences dropped
    masking = {'atten_mask': _causal_mask(q.device), 'sparse_mode': 3} if causal else {}
    return torch_npu.npu_fusion_attention(q, k, v, q.shape[1], 'TND', scale=scale, keep_prob=1.0,
                                          actual_seq_qlen=ends, actual_seq_kvlen=ends, **masking)[0]
