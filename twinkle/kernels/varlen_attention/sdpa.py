"""Varlen attention as one batched SDPA call: exact, on any device torch runs on.

The packed sequences are gathered into a padded ``(sequences, heads, longest, dim)`` batch, and
one boolean mask hides padded keys (and future keys when causal), so no query ever sees another
sequence or a pad. SDPA picks its fused CPU/GPU kernel and handles grouped-query heads itself.
The cost is the padding of the batch: length-skewed packs pay for their longest sequence.

Nothing here reads a tensor's values on the host (that would stall the GPU once per layer): the
padded length is ``max_seqlen`` from the batch, empty sequences stay in as fully padded rows, and
the result is gathered back by index, not by a boolean mask.

``varlen_attention_lse`` (a block of ring attention) runs torch's fused CPU flash kernel, which
returns the log-sum-exp and never holds the scores; forward only, its backward a separate function
fed the merged output and log-sum-exp (the flash-attention way of differentiating split blocks).
"""
import torch
import torch.nn.functional as F

from twinkle.utils.logger import get_logger

logger = get_logger(__name__)
HALF_DTYPES = (torch.float16, torch.bfloat16)
_warned = set()


def _padded_layout(cu_seq_lens: torch.Tensor, total: int, longest: int):
    """Token index of every (sequence, slot), which slots are real tokens, and for every token its
    (sequence, slot)."""
    cu_seq_lens = cu_seq_lens.long()
    starts, lengths = cu_seq_lens[:-1], cu_seq_lens.diff()
    slots = torch.arange(longest, device=cu_seq_lens.device)
    real = slots < lengths[:, None]
    index = (starts[:, None] + slots).clamp(max=total - 1)
    tokens = torch.arange(total, device=cu_seq_lens.device)
    sequence = torch.searchsorted(cu_seq_lens[1:], tokens, right=True)
    return index, real, sequence, tokens - starts[sequence]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                     causal: bool, scale: float, max_seqlen: int) -> torch.Tensor:
    if q.shape[0] == 0 or max_seqlen == 0:
        return q.clone()
    index, real, sequence, slot = _padded_layout(cu_seq_lens, q.shape[0], max_seqlen)
    q_b, k_b, v_b = (t[index].transpose(1, 2) for t in (q, k, v))  # (sequences, heads, longest, dim)
    mask = real[:, None, None, :]
    if causal:
        mask = mask & torch.ones(max_seqlen, max_seqlen, dtype=torch.bool, device=q.device).tril()
    # A padded query row (an empty sequence's, above all) sees key slot 0 too, so that no row is
    # fully masked (NaN in its softmax and its gradient); its output is never gathered.
    mask = mask | ((~real)[:, None, :, None] & (torch.arange(max_seqlen, device=q.device) == 0))
    out = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)[sequence, slot]


def fallback(backend: str, q, k, v, cu_seq_lens, causal, scale, max_seqlen) -> torch.Tensor:
    """For fused kernels that take fp16/bf16 only: other dtypes run here, said once per backend."""
    if backend not in _warned:
        _warned.add(backend)
        logger.warning('varlen_attention: %s takes fp16/bf16 only; %s inputs run on sdpa', backend, q.dtype)
    return varlen_attention(q, k, v, cu_seq_lens, causal, scale, max_seqlen)


def _block_layout(q, k, cu_seq_lens_q, cu_seq_lens_k, causal, longest_q, longest_k):
    """Padded (sequences, slots) layouts of a block's queries and keys, and the additive mask: a
    key is seen when real (and not after the query's slot if causal); a padded query sees key slot 0."""
    index_q, real_q, sequence_q, slot_q = _padded_layout(cu_seq_lens_q, q.shape[0], longest_q)
    index_k, real_k, _, _ = _padded_layout(cu_seq_lens_k, k.shape[0], longest_k)
    seen = real_k[:, None, None, :].expand(-1, 1, longest_q, -1)
    if causal:
        seen = seen & torch.ones(longest_q, longest_k, dtype=torch.bool, device=q.device).tril()
    seen = seen | ((~real_q)[:, None, :, None] & (torch.arange(longest_k, device=q.device) == 0))
    mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, float('-inf'))
    return index_q, index_k, sequence_q, slot_q, mask


def longest(cu_seq_lens: torch.Tensor) -> int:
    return max(int(cu_seq_lens.diff().max()), 1) if cu_seq_lens.numel() > 1 else 1


def without_empty_keys(out: torch.Tensor, lse: torch.Tensor, cu_seq_lens_q, cu_seq_lens_k):
    """A sequence with queries but no keys: output 0 and log-sum-exp -inf, whatever a kernel wrote."""
    real_keys = torch.repeat_interleave(cu_seq_lens_k.diff() > 0, cu_seq_lens_q.diff().long(),
                                        output_size=out.shape[0])
    return (out.masked_fill(~real_keys[:, None, None], 0.0),  # not a product: a kernel may have written NaN
            lse.masked_fill(~real_keys[:, None], float('-inf')))


def reference_block(backend: str, reason, *arguments):
    """A block a fused kernel cannot run, on the reference (logged once per reason)."""
    from . import reference
    if reason and (backend, reason) not in _warned:
        _warned.add((backend, reason))
        logger.warning('varlen_attention_lse: %s; the block runs on the reference', reason)
    return reference.varlen_attention_lse(*arguments)


def reference_block_backward(backend: str, reason, *arguments):
    from . import reference
    if reason and (backend, reason) not in _warned:
        _warned.add((backend, reason))
        logger.warning('varlen_attention_lse_backward: %s; the block runs on the reference', reason)
    return reference.varlen_attention_lse_backward(*arguments)


def _grouped(t: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    """(tokens, heads, dim) -> (sequences, heads x groups, slots, dim), kv heads repeated for GQA."""
    return t[index].transpose(1, 2).repeat_interleave(groups, dim=1).contiguous()


def varlen_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                         cu_seq_lens_k: torch.Tensor, causal: bool, scale: float):
    """The block through torch's fused CPU flash kernel (it returns the log-sum-exp), no scores
    held: forward only; its gradients come from ``varlen_attention_lse_backward``."""
    if q.shape[0] == 0:
        return q.new_zeros(q.shape, dtype=torch.float32), q.new_zeros(q.shape[:2], dtype=torch.float32)
    if k.shape[0] == 0:
        return (q.new_zeros(q.shape, dtype=torch.float32),
                q.new_full(q.shape[:2], float('-inf'), dtype=torch.float32))
    groups = q.shape[1] // k.shape[1]
    index_q, index_k, sequence, slot, mask = _block_layout(q, k, cu_seq_lens_q, cu_seq_lens_k, causal,
                                                           longest(cu_seq_lens_q), longest(cu_seq_lens_k))
    with torch.no_grad():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[index_q].transpose(1, 2).contiguous(), _grouped(k, index_k, groups), _grouped(v, index_k, groups),
            0.0, False, attn_mask=mask, scale=scale)
    lse = lse.transpose(1, 2)[sequence, slot]
    real_keys = (cu_seq_lens_k.diff() > 0)[sequence]  # a sequence without keys: 0 and -inf, not slot 0's
    return (out.transpose(1, 2)[sequence, slot].float() * real_keys[:, None, None],
            lse.masked_fill(~real_keys[:, None], float('-inf')))


def varlen_attention_lse_backward(grad_out, q, k, v, out, lse, cu_seq_lens_q, cu_seq_lens_k, causal: bool,
                                  scale: float):
    """Flash attention's backward with the merged output and log-sum-exp: P = exp(S - lse) and
    D = rowsum(grad_out * out) are then exactly the block's part of the whole attention."""
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    groups = q.shape[1] // k.shape[1]
    longest_q, longest_k = longest(cu_seq_lens_q), longest(cu_seq_lens_k)
    index_q, index_k, sequence, slot, mask = _block_layout(q, k, cu_seq_lens_q, cu_seq_lens_k, causal,
                                                           longest_q, longest_k)
    real_q = torch.zeros(index_q.shape, dtype=torch.bool, device=q.device)
    real_q[sequence, slot] = True

    def padded(t, fill=0.0):  # (tokens, ...) -> (sequences, slots, ...), ``fill`` in padded slots
        return t[index_q].masked_fill(~real_q.reshape(*real_q.shape, *[1] * (t.dim() - 1)), fill)

    # padded queries (and any without keys): no gradient, and lse = +inf so that their P is 0
    lse = lse.float().masked_fill(lse == float('-inf'), float('inf'))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        padded(grad_out.to(q.dtype)).transpose(1, 2).contiguous(), q[index_q].transpose(1, 2).contiguous(),
        _grouped(k, index_k, groups), _grouped(v, index_k, groups),
        padded(out.to(q.dtype)).transpose(1, 2).contiguous(),
        padded(lse, float('inf')).transpose(1, 2).contiguous(), 0.0, False, attn_mask=mask, scale=scale)
    grad_q = dq.transpose(1, 2)[sequence, slot]
    keys = torch.arange(k.shape[0], device=k.device)
    key_sequence = torch.searchsorted(cu_seq_lens_k.long()[1:], keys, right=True)
    key_slot = keys - cu_seq_lens_k.long()[key_sequence]
    heads_k = k.shape[1]

    def ungrouped(t):  # (sequences, heads x groups, slots, dim) -> (tokens, kv heads, dim), GQA copies summed
        t = t.reshape(t.shape[0], heads_k, groups, *t.shape[2:]).sum(2).transpose(1, 2)
        return t[key_sequence, key_slot]

    return grad_q, ungrouped(dk), ungrouped(dv)
