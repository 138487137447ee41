"""Varlen attention as one batched SDPA call: exact, on any device torch runs on.

The packed sequences are gathered into a padded ``(sequences, heads, longest, dim)`` batch, and
one boolean mask hides padded keys (and future keys when causal), so no query ever sees another
sequence or a pad. SDPA picks its fused CPU/GPU kernel and handles grouped-query heads itself.
The cost is the padding of the batch: length-skewed packs pay for their longest sequence.
"""
import torch
import torch.nn.functional as F

from twinkle.utils.logger import get_logger

logger = get_logger(__name__)
HALF_DTYPES = (torch.float16, torch.bfloat16)
_warned = set()


def _padded_layout(cu_seq_lens: torch.Tensor, total: int):
    """Token index of every (sequence, slot) and which slots are real tokens."""
    lengths = cu_seq_lens.diff()
    nonempty = lengths > 0
    starts, lengths = cu_seq_lens[:-1][nonempty], lengths[nonempty]
    slots = torch.arange(int(lengths.max()), device=cu_seq_lens.device)
    real = slots < lengths[:, None]
    index = (starts[:, None] + slots).clamp(max=total - 1)
    return index.long(), real


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                     causal: bool, scale: float) -> torch.Tensor:
    if q.shape[0] == 0:
        return q.clone()
    index, real = _padded_layout(cu_seq_lens, q.shape[0])
    q_b, k_b, v_b = (t[index].transpose(1, 2) for t in (q, k, v))  # (sequences, heads, longest, dim)
    mask = real[:, None, None, :]
    if causal:
        mask = mask & torch.ones(real.shape[1], real.shape[1], dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)[real]


def fallback(backend: str, q, k, v, cu_seq_lens, causal, scale) -> torch.Tensor:
    """For fused kernels that take fp16/bf16 only: other dtypes run here, said once per backend."""
    if backend not in _warned:
        _warned.add(backend)
        logger.warning('varlen_attention: %s takes fp16/bf16 only; %s inputs run on sdpa', backend, q.dtype)
    return varlen_attention(q, k, v, cu_seq_lens, causal, scale)
