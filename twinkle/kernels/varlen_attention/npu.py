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


# -- blocks of a split attention (ring attention) ------------------------------------------------------

def _block_arguments(q, cu_seq_lens_q, cu_seq_lens_k, causal):
    """TND sequence ends for queries and keys; None where TND cannot say it (a sequence with queries
    but no keys, or keys but no queries: one side's end would repeat, and dropping the sequence from
    one list only would hand its tokens to the next sequence)."""
    lengths_q, lengths_k = cu_seq_lens_q.diff().tolist(), cu_seq_lens_k.diff().tolist()  # one host read
    if any((n_q == 0) != (n_k == 0) for n_q, n_k in zip(lengths_q, lengths_k)):
        return None
    kept = [index for index, n_q in enumerate(lengths_q) if n_q > 0]  # empty on both sides: dropped
    ends_q, ends_k = cu_seq_lens_q[1:].tolist(), cu_seq_lens_k[1:].tolist()
    masking = {'atten_mask': _causal_mask(q.device), 'sparse_mode': 3} if causal else {}
    return [ends_q[i] for i in kept], [ends_k[i] for i in kept], masking


def _plan(q, cu_seq_lens_q, cu_seq_lens_k, causal):
    """(TND arguments, None), or (None, why the block runs on the reference; None for no queries)."""
    from .flash import block_unsupported
    reason = block_unsupported(q, cu_seq_lens_q, cu_seq_lens_k, causal, 'npu_fusion_attention')
    if reason or q.shape[0] == 0:
        return None, reason
    layout = _block_arguments(q, cu_seq_lens_q, cu_seq_lens_k, causal)
    return layout, None if layout else ('npu_fusion_attention (TND): a sequence has queries but no keys, '
                                        'or keys but no queries')


def varlen_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                         cu_seq_lens_k: torch.Tensor, causal: bool, scale: float):
    """``npu_fusion_attention`` (TND): lse = softmax_max + log(softmax_sum), both (T, N, 8) replicated."""
    layout, reason = _plan(q, cu_seq_lens_q, cu_seq_lens_k, causal)
    if layout is None:
        return sdpa.reference_block('npu', reason, q, k, v, cu_seq_lens_q, cu_seq_lens_k, causal, scale)
    import torch_npu
    ends_q, ends_k, masking = layout
    out, softmax_max, softmax_sum = torch_npu.npu_fusion_attention(
        q, k, v, q.shape[1], 'TND', scale=scale, keep_prob=1.0, actual_seq_qlen=ends_q, actual_seq_kvlen=ends_k,
        **masking)[:3]
    lse = softmax_max[..., 0].float() + softmax_sum[..., 0].float().log()
    return out.float(), lse


def varlen_attention_lse_backward(grad_out, q, k, v, out, lse, cu_seq_lens_q, cu_seq_lens_k, causal: bool,
                                  scale: float):
    """``npu_fusion_attention_grad`` with softmax_max = the merged lse and softmax_sum = 1, so that its
    P = exp(S - max) / sum is the block's part of the whole attention (D from the merged output)."""
    layout, reason = _plan(q, cu_seq_lens_q, cu_seq_lens_k, causal)
    if layout is None:
        return sdpa.reference_block_backward('npu', reason, grad_out, q, k, v, out, lse, cu_seq_lens_q,
                                             cu_seq_lens_k, causal, scale)
    import torch_npu
    ends_q, ends_k, masking = layout
    softmax_max = lse.float().masked_fill(lse == float('-inf'), float('inf'))[..., None].expand(-1, -1, 8)
    dq, dk, dv = torch_npu.npu_fusion_attention_grad(
        q, k, v, grad_out.to(q.dtype), q.shape[1], 'TND', softmax_max=softmax_max.contiguous(),
        softmax_sum=torch.ones_like(softmax_max), attention_in=out.to(q.dtype), scale_value=scale, keep_prob=1.0,
        actual_seq_qlen=ends_q, actual_seq_kvlen=ends_k, **masking)[:3]
    return dq, dk, dv
