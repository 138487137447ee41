"""Varlen attention in plain PyTorch: each sequence attends to itself alone, one at a time.

The oracle of the tests and the fallback everywhere: a loop over sequences, each a dense
attention computed in fp32 (key/value heads repeated for grouped-query attention), rounded
once to the input dtype. Registered as the op ``twinkle_ref::varlen_attention`` (autograd by
recompute, see ``kernels/library.py``); the loop reads the boundaries on the host, so the fake
kernel states the output shape instead.

``varlen_attention_lse`` is the block of a split attention (ring attention's key blocks): queries
and keys of a sequence may differ in number, and it returns the log-sum-exp with the fp32 output.
"""
from typing import Tuple

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


def _varlen_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                          cu_seq_lens_k: torch.Tensor, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequence i's queries ``q[cu_q[i]:cu_q[i+1]]`` attend its keys ``k[cu_k[i]:cu_k[i+1]]``; causal:
    query slot t sees key slots <= t (aligned at the sequence starts). Returns the fp32 output and
    the fp32 log-sum-exp of each query's scaled scores (``-inf`` with no key to see), what a merge
    of partial attentions over key blocks needs."""
    groups = q.shape[1] // k.shape[1]
    outs = [q.new_empty((0, *q.shape[1:]), dtype=torch.float32)]
    lses = [q.new_empty((0, q.shape[1]), dtype=torch.float32)]
    bounds_q, bounds_k = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    for q_start, q_end, k_start, k_end in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        if k_start == k_end:  # nothing to see: no output, log-sum-exp of no scores
            outs.append(q.new_zeros((q_end - q_start, *q.shape[1:]), dtype=torch.float32))
            lses.append(q.new_full((q_end - q_start, q.shape[1]), float('-inf'), dtype=torch.float32))
            continue
        q_seq = q[q_start:q_end].float().transpose(0, 1)                                # (heads, len_q, dim)
        k_seq = k[k_start:k_end].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        v_seq = v[k_start:k_end].float().transpose(0, 1).repeat_interleave(groups, dim=0)
        scores = scale * q_seq @ k_seq.transpose(1, 2)                                  # (heads, len_q, len_k)
        if causal:
            seen = torch.ones(scores.shape[1:], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~seen, float('-inf'))
        seq_lse = scores.logsumexp(dim=-1)                                              # finite: key 0 is seen
        outs.append(((scores - seq_lse[..., None]).exp() @ v_seq).transpose(0, 1))
        lses.append(seq_lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def _varlen_attention_lse_fake(q, k, v, cu_seq_lens_q, cu_seq_lens_k, causal, scale):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32)


varlen_attention_lse = reference_op('varlen_attention_lse', _varlen_attention_lse, fake=_varlen_attention_lse_fake)


def varlen_attention_lse_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                                  cu_seq_lens_k: torch.Tensor, causal: bool, scale: float):
    """The block's share of dq, dk, dv when its partial result was merged into ``out`` / ``lse``
    (the final output and log-sum-exp of its queries): the merge's gradient reaches the block's
    output as w grad_out and its log-sum-exp as w <grad_out, out_b - out>, w = exp(lse_b - lse);
    autograd of the block does the rest."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        block_out, block_lse = _varlen_attention_lse(*leaves, cu_seq_lens_q, cu_seq_lens_k, causal, scale)
        weight = (block_lse - lse).exp()
        grads = (weight[..., None] * grad_out, weight * (grad_out * (block_out - out)).sum(-1))
        return torch.autograd.grad((block_out, block_lse), leaves, grads, allow_unused=True)
