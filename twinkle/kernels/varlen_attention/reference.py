"""Varlen attention in plain PyTorch: each sequence attends to itself alone, one at a time.

The oracle of the tests and the fallback everywhere: a loop over sequences, each a dense
attention computed in fp32 (key/value heads repeated for grouped-query attention), rounded
once to the input dtype. Registered as the op ``twinkle_ref::varlen_attention`` (autograd by
recompute, see ``kernels/library.py``); the loop reads the boundaries on the host, so the fake
kernel states the output shape instead.
"""
import torch
import torch.nn.functional as F

from ..library import reference_op


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                      causal: bool, scale: float, max_seqlen: int) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seq_lens.tolist()
    outputs = [q.new_empty(0, *q.shape[1:])]  # no tokens: nothing to attend
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start == end:
            continue
        q_seq = q[start:end].float().transpose(0, 1)                                   # (heads, len, dim)
        k_seq = k[start:end].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        v_seq = v[start:end].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, is_causal=causal, scale=scale)
        outputs.append(out.transpose(0, 1).to(q.dtype))
    return torch.cat(outputs)


def _varlen_attention_fake(q, k, v, cu_seq_lens, causal, scale, max_seqlen):
    """One output row per token of q (the boundaries cover all of them)."""
    return q.new_empty(q.shape)


varlen_attention = reference_op('varlen_attention', _varlen_attention, fake=_varlen_attention_fake)
