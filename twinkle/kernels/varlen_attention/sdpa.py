"""Varlen attention as one batched SDPA call: exact, on any device torch runs on.

The packed sequences are gathered into a padded ``(sequences, heads, longest, dim)`` batch, and
one boolean mask hides padded keys (and future keys when causal), so no query ever sees another
sequence or a pad. SDPA picks its fused CPU/GPU kernel and handles grouped-query heads itself.
The cost is the padding of the batch: length-skewed packs pay for their longest sequence.

Nothing here reads a tensor's values on the host (that would stall the GPU once per layer): the
padded length is ``max_seqlen`` from the batch, empty sequences stay in as fully padded rows, and
the result is gathered back by index, not by a boolean mask.
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
