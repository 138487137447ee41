"""Rotary position embedding of queries and keys, with Hugging Face's ``apply_rotary_pos_emb``
semantics (rotate_half layout) and partial rotary (only the first ``cos.shape[-1]`` dims rotate).

The registry op is named 'rope'; each backend module exposes ``rope(q, k, cos, sin, unsqueeze_dim)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import registry
from ..checks import require_same_device, require_size, require_tensor
from ..native import NATIVE_CPU

registry.register('rope', ['reference', 'cpu', 'triton', 'liger', 'npu'], cpu=NATIVE_CPU)

# unsqueeze_dim -> where q's heads and sequence sit (HF: 1 for (B, H, T, D), 2 for (B, T, H, D))
LAYOUTS = {1: '(batch, heads, seq, head_dim)', 2: '(batch, seq, heads, head_dim)'}


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                         unsqueeze_dim: int = 1, backend: Optional[str] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` as in Hugging Face.

    ``q``/``k``: (B, H, T, D) with ``unsqueeze_dim=1`` or (B, T, H, D) with ``unsqueeze_dim=2``;
    k may have fewer heads. ``cos``/``sin``: (B or 1, T or 1, D_rot), unsqueezed at
    ``unsqueeze_dim``; D_rot is even and <= D. With D_rot < D only the first D_rot dims of each
    head rotate and the rest pass through (partial rotary, as Phi/StableLM apply it). The math
    runs in fp32; results keep q's and k's dtypes. Gradients reach q and k on every backend, and
    cos/sin only on 'reference' (HF builds them under no_grad, so the fast backends skip them).
    ``backend`` forces an implementation (see ``twinkle.kernels.select('rope')``).
    """
    require_tensor('q', q, floating=True, dims=(4,))
    require_tensor('k', k, floating=True, dims=(4,))
    require_tensor('cos', cos, floating=True, dims=(3,))
    require_tensor('sin', sin, floating=True, dims=(3,))
    require_same_device('q', q, k=k, cos=cos, sin=sin)
    if unsqueeze_dim not in LAYOUTS:
        raise ValueError(f'unsqueeze_dim must be 1 (q is {LAYOUTS[1]}) or 2 (q is {LAYOUTS[2]}), '
                         f'got {unsqueeze_dim!r}')
    seq_dim = 3 - unsqueeze_dim
    batch, seq_len, head_dim = q.shape[0], q.shape[seq_dim], q.shape[3]
    require_size('k', k.shape[0], batch, 'batch size equal to that of q,')
    require_size('k', k.shape[seq_dim], seq_len, f'sequence length (dim {seq_dim}) equal to that of q,')
    require_size('k', k.shape[3], head_dim, 'head dim equal to that of q,')
    if sin.shape != cos.shape:
        raise ValueError(f'sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}')
    rotary_dim = cos.shape[2]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f'cos: last dim (the rotary dim) must be even and <= the head dim {head_dim} '
                         f'of q, got {rotary_dim}')
    for dim, size, what in ((0, batch, 'batch size'), (1, seq_len, 'sequence length')):
        if cos.shape[dim] not in (1, size):
            raise ValueError(f'cos: {what} (dim {dim}) must be 1 or {size} like q, got {cos.shape[dim]}')
    return registry.resolve('rope', backend, q.device)(q, k, cos, sin, unsqueeze_dim)


__all__ = ['apply_rotary_pos_emb']
