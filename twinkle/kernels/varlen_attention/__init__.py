"""Varlen attention: packed sequences attend within themselves only.

Packing puts several samples in one row of ``total`` tokens; ``cu_seq_lens`` (cumulative
lengths, ``[0, len0, len0+len1, ..., total]``) says where each begins. Attention must not cross
those boundaries, or a packed batch would train differently from the same samples padded.
Backends: ``flash_attn`` (CUDA), ``npu`` (torch_npu fusion attention), ``sdpa`` (one batched,
masked SDPA: exact anywhere) and ``reference`` (a loop over sequences, the oracle); for the blocks,
``sdpa`` (torch's fused CPU kernel), ``flash_attn`` and ``npu`` (fp16/bf16, forward with the
log-sum-exp and backward from the merged result), ``reference`` elsewhere and for what the fused
kernels cannot express (a causal block of unequal counts; on NPU a sequence with queries but no keys).
``register_hf_attention()`` makes it a Hugging Face attention implementation.
``varlen_attention_lse`` is one block of a split attention (queries and keys of a sequence in
different numbers, the log-sum-exp returned): what ring attention merges (``twinkle.parallel``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import registry
from ..checks import check_values, require_boundaries, require_same_device, require_size, require_tensor
from ..registry import Impl

_FLASH = Impl('flash', devices=('cuda',), packages=('flash_attn',), extra='flash-attn',
              check=lambda target: None if target.has_flash_attn else 'flash-attn 2 needs sm80+')
registry.register('varlen_attention', {'reference': 'reference', 'sdpa': Impl('sdpa'), 'flash_attn': _FLASH, 'npu': 'npu'},
                  priority={'cuda': ['flash_attn', 'sdpa', 'reference'], 'npu': ['npu', 'sdpa', 'reference'],
                            '*': ['sdpa', 'reference']})
# The blocks of ring attention; the fused backends are forward only (gradients: varlen_attention_lse_backward).
registry.register('varlen_attention_lse',
                  {'reference': 'reference', 'sdpa': Impl('sdpa', devices=('cpu',)), 'flash_attn': _FLASH, 'npu': 'npu'},
                  {'cpu': ['sdpa', 'reference'], 'cuda': ['flash_attn', 'reference'], 'npu': ['npu', 'reference'],
                   '*': ['reference']}, package='twinkle.kernels.varlen_attention')


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, *,
                     causal: bool = True, scale: Optional[float] = None, max_seqlen: Optional[int] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention over packed sequences: ``q`` ``(total, heads, dim)``, ``k``/``v`` ``(total, kv_heads,
    dim)`` with kv_heads dividing heads (grouped-query attention), ``cu_seq_lens`` the int
    boundaries ``(sequences + 1,)``. Returns ``(total, heads, dim)`` in q's dtype.

    ``max_seqlen`` is the longest sequence (an int the batch carries: ``max_length_q``); without it
    the op reads it from ``cu_seq_lens``, which waits for the device. The boundaries' values are
    checked where the batch is built (``checks.check_batch``), here only with TWINKLE_CHECK_VALUES=1.
    ``scale`` defaults to ``dim ** -0.5``; ``backend`` forces an implementation.
    """
    require_tensor('q', q, floating=True, dims=(3,))
    require_tensor('k', k, floating=True, dims=(3,))
    require_tensor('v', v, floating=True, dims=(3,))
    require_tensor('cu_seq_lens', cu_seq_lens, dims=(1,))
    require_same_device('q', q, k=k, v=v, cu_seq_lens=cu_seq_lens)
    if k.shape != v.shape:
        raise ValueError(f'k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}')
    require_size('k', k.shape[0], q.shape[0], 'tokens (dim 0) equal to those of q,')
    require_size('k', k.shape[2], q.shape[2], 'head dim equal to that of q,')
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f'k: its {k.shape[1]} heads must divide the {q.shape[1]} heads of q')
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f'q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
    if cu_seq_lens.dtype.is_floating_point or cu_seq_lens.dtype == torch.bool or cu_seq_lens.numel() == 0:
        raise ValueError(f'cu_seq_lens must be a non-empty integer tensor, got dtype {cu_seq_lens.dtype}')
    if check_values():
        require_boundaries('cu_seq_lens', cu_seq_lens, q.shape[0])
    scale = q.shape[2] ** -0.5 if scale is None else scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f'scale must be a positive finite number, got {scale!r}')
    if max_seqlen is None:
        max_seqlen = int(cu_seq_lens.diff().max()) if cu_seq_lens.numel() > 1 else 0  # reads the device
    elif isinstance(max_seqlen, torch.Tensor) or int(max_seqlen) < 0:
        raise ValueError(f'max_seqlen must be a non-negative int (the batch\'s max_length_q), got {max_seqlen!r}')
    return registry.resolve('varlen_attention', backend, q.device)(
        q, k, v, cu_seq_lens, bool(causal), float(scale), int(max_seqlen))


def varlen_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                         cu_seq_lens_k: torch.Tensor, *, causal: bool = False, scale: Optional[float] = None,
                         backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block attention for a merge: sequence i's queries ``q[cu_seq_lens_q[i]:cu_seq_lens_q[i+1]]``
    (``q`` ``(total_q, heads, dim)``) attend its keys ``k[cu_seq_lens_k[i]:cu_seq_lens_k[i+1]]``
    (``k``/``v`` ``(total_k, kv_heads, dim)``); ``causal``: query slot t sees key slots <= t.
    Returns the output ``(total_q, heads, dim)`` and the log-sum-exp of the scaled scores
    ``(total_q, heads)``, both fp32 (partials are merged before rounding); ``-inf`` / 0 for a
    query with no key to see. The reference is differentiable in q, k, v through both outputs;
    the fused ``sdpa`` backend (CPU) is forward only: blocks of a split attention take their
    gradients from ``varlen_attention_lse_backward``, as flash attention does."""
    require_tensor('q', q, floating=True, dims=(3,))
    require_tensor('k', k, floating=True, dims=(3,))
    require_tensor('v', v, floating=True, dims=(3,))
    require_tensor('cu_seq_lens_q', cu_seq_lens_q, dims=(1,))
    require_tensor('cu_seq_lens_k', cu_seq_lens_k, dims=(1,))
    require_same_device('q', q, k=k, v=v, cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k)
    if k.shape != v.shape:
        raise ValueError(f'k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}')
    require_size('k', k.shape[2], q.shape[2], 'head dim equal to that of q,')
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f'k: its {k.shape[1]} heads must divide the {q.shape[1]} heads of q')
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f'q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
    for name, bounds in (('cu_seq_lens_q', cu_seq_lens_q), ('cu_seq_lens_k', cu_seq_lens_k)):
        if bounds.dtype.is_floating_point or bounds.dtype == torch.bool or bounds.numel() == 0:
            raise ValueError(f'{name} must be a non-empty integer tensor, got dtype {bounds.dtype}')
    require_size('cu_seq_lens_k', cu_seq_lens_k.shape[0], cu_seq_lens_q.shape[0],
                 'as many boundaries as cu_seq_lens_q,')
    if check_values():
        require_boundaries('cu_seq_lens_q', cu_seq_lens_q, q.shape[0])
        require_boundaries('cu_seq_lens_k', cu_seq_lens_k, k.shape[0])
    scale = q.shape[2] ** -0.5 if scale is None else scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f'scale must be a positive finite number, got {scale!r}')
    implementation = registry.resolve('varlen_attention_lse', backend, q.device)
    fused = implementation.__module__.rsplit('.', 1)[-1]
    if fused in ('sdpa', 'flash', 'npu') and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(f'varlen_attention_lse: the {fused} backend is forward only (its gradients come from '
                         f'varlen_attention_lse_backward); pass backend="reference" to differentiate it directly')
    return implementation(q, k, v, cu_seq_lens_q, cu_seq_lens_k, bool(causal), float(scale))


def varlen_attention_lse_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                                  cu_seq_lens_k: torch.Tensor, *, causal: bool = False, scale: Optional[float] = None,
                                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block of ``varlen_attention_lse`` whose partial result was merged into
    ``out`` ``(total_q, heads, dim)`` and ``lse`` ``(total_q, heads)``, the final output and
    log-sum-exp of its queries, given ``grad_out``, the gradient of that final output. Summed over
    the blocks, they are the gradients of the whole attention. Arguments as ``varlen_attention_lse``."""
    for name, tensor, shape in (('grad_out', grad_out, q.shape), ('out', out, q.shape), ('lse', lse, q.shape[:2])):
        require_tensor(name, tensor, floating=True)
        require_size(name, tuple(tensor.shape), tuple(shape), 'shape')
    require_same_device('q', q, grad_out=grad_out, out=out, lse=lse)
    scale = q.shape[2] ** -0.5 if scale is None else scale
    implementation = registry.resolve('varlen_attention_lse', backend, q.device, variant='backward')
    return tuple(implementation(grad_out, q, k, v, out, lse, cu_seq_lens_q, cu_seq_lens_k, bool(causal),
                                float(scale)))


from .hf_attention import HF_ATTENTION_NAME, register_hf_attention  # noqa: E402  (uses the op above)

__all__ = ['HF_ATTENTION_NAME', 'register_hf_attention', 'varlen_attention', 'varlen_attention_lse',
           'varlen_attention_lse_backward']
