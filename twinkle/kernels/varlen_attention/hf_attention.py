"""``varlen_attention`` as a Hugging Face attention implementation named ``twinkle_varlen``.

After ``register_hf_attention()``, a model loaded with ``attn_implementation='twinkle_varlen'``
(or whose ``config._attn_implementation`` is set to it) runs every attention layer through the
op. Sequence boundaries come from ``position_ids`` (a new sequence wherever they restart at 0),
or from ``cu_seq_lens_q`` when the batch carries it, and from the padding mask: Hugging Face
hands this implementation the 2-D mask (the flash-attention convention) instead of building a
4-D one, and pads are dropped before attention. So packed rows, padded rows and padded packed
rows all attend within their sequences only. Training only: no KV cache, no dropout.

The fast path is the packed batch twinkle's InputProcessor builds: ``cu_seq_lens_q`` and
``max_length_q`` computed once per batch on the host, no padding mask. Then no layer reads a
tensor's values (no host-device sync per layer). Boundaries derived here from ``position_ids`` or
a padding mask need one read per layer (the number of sequences and real tokens).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

HF_ATTENTION_NAME = 'twinkle_varlen'


def register_hf_attention() -> str:
    """Register ``twinkle_varlen`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(HF_ATTENTION_NAME, hf_varlen_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, flash_attention_mask)
    return HF_ATTENTION_NAME


def hf_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                        dropout: float = 0.0, position_ids: Optional[torch.Tensor] = None,
                        cu_seq_lens_q: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                        sliding_window: Optional[int] = None, **_) -> Tuple[torch.Tensor, None]:
    """Hugging Face's attention signature: ``query`` ``(batch, heads, seq, dim)`` in, ``(batch, seq,
    heads, dim)`` out, no attention weights."""
    from . import varlen_attention
    if dropout:
        raise ValueError(f'{HF_ATTENTION_NAME} has no attention dropout; got dropout={dropout}')
    if sliding_window is not None:
        raise ValueError(f'{HF_ATTENTION_NAME} has no sliding window; got sliding_window={sliding_window}')
    batch, heads, length, dim = query.shape
    if key.shape[2] != length:
        raise ValueError(f'{HF_ATTENTION_NAME} is for training (queries and keys of the same tokens); '
                         f'got {length} queries and {key.shape[2]} keys (a KV cache?)')
    if attention_mask is not None and attention_mask.shape != (batch, length):
        raise ValueError(f'{HF_ATTENTION_NAME} takes a 2-D padding mask of shape {(batch, length)}, got '
                         f'{tuple(attention_mask.shape)} (a prepared 4-D mask cannot be split into sequences)')
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    real = attention_mask.reshape(-1).bool() if attention_mask is not None else None
    if real is not None:
        q, k, v = q[real], k[real], v[real]
    if cu_seq_lens_q is None or real is not None:
        cu_seq_lens_q = _boundaries(position_ids, attention_mask, batch, length, query.device)
        max_length_q = None  # the batch's describes the rows with their pads
    out = varlen_attention(q, k, v, cu_seq_lens_q, causal=getattr(module, 'is_causal', True), scale=scaling,
                           max_seqlen=None if max_length_q is None else int(max_length_q))
    if real is not None:
        out = out.new_zeros(batch * length, heads, dim).index_put((real,), out)
    return out.reshape(batch, length, heads, dim), None


def _boundaries(position_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], batch: int,
                length: int, device: torch.device) -> torch.Tensor:
    """cu_seq_lens over the real tokens, flattened row by row: a sequence starts at each row's
    first real token and wherever position_ids restart at 0."""
    real = (attention_mask.bool() if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device))
    starts = real & ~torch.nn.functional.pad(real, (1, 0), value=False)[:, :-1]
    if position_ids is not None:
        starts |= position_ids.expand(batch, length) == 0
    starts = starts[real]
    return torch.cat([starts.nonzero().flatten(), torch.tensor([starts.numel()], device=device)])
