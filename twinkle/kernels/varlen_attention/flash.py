"""Varlen attention with flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16).

The packed layout is flash-attn's own: no gather, no padding, GQA native.
"""
import torch

from . import sdpa


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor,
                     causal: bool, scale: float, max_seqlen: int) -> torch.Tensor:
    if q.dtype not in sdpa.HALF_DTYPES:
        return sdpa.fallback('flash_attn', q, k, v, cu_seq_lens, causal, scale, max_seqlen)
    from flash_attn import flash_attn_varlen_func
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu_seq_lens, cu_seq_lens, max_seqlen, max_seqlen,
                                  softmax_scale=scale, causal=causal)


# -- blocks of a split attention (ring attention): forward with the log-sum-exp, backward from the merge --

# flash-attn's varlen kernels under the arguments each release names (2.5 takes window_size as a pair,
# 2.6+ as two ints and adds softcap / block_table / leftpad_k / seqused_k).
_OPTIONAL_ARGUMENTS = {'window_size': (-1, -1), 'window_size_left': -1, 'window_size_right': -1, 'softcap': 0.0,
                       'alibi_slopes': None, 'return_softmax': False, 'block_table': None, 'leftpad_k': None,
                       'seqused_k': None, 'deterministic': False, 'rng_state': None}


def block_unsupported(q: torch.Tensor, cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor,
                      causal: bool, engine: str):
    """Why a fused kernel cannot run this block (None: it can). Causal blocks must pair equal query and
    key counts: the fused kernels align a causal mask bottom-right, the op's contract is top-left
    (equal counts make the two the same; ring attention's causal blocks are diagonal ones)."""
    if q.dtype not in sdpa.HALF_DTYPES:
        return f'{engine} takes fp16/bf16 only, got {q.dtype}'
    if causal and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        return f'{engine} aligns causal masks bottom-right; this causal block pairs unequal query and key counts'
    return None


def _call(function, *positional, **arguments):
    """Call a flash-attn internal with the arguments its signature names (defaults for the rest)."""
    import inspect
    names = list(inspect.signature(function).parameters)[len(positional):]
    known = {**_OPTIONAL_ARGUMENTS, **arguments}
    missing = [name for name in names if name not in known and
               inspect.signature(function).parameters[name].default is inspect.Parameter.empty]
    if missing:
        raise RuntimeError(f'this flash-attn release asks for {missing} in {function.__name__}: not a version '
                           f'twinkle knows (2.5-2.8); pass backend="reference"')
    return function(*positional, **{name: known[name] for name in names if name in known})


def varlen_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                         cu_seq_lens_k: torch.Tensor, causal: bool, scale: float):
    """``_flash_attn_varlen_forward``: the output and its (heads, total_q) log-sum-exp, no scores held."""
    reason = block_unsupported(q, cu_seq_lens_q, cu_seq_lens_k, causal, 'flash-attn')
    if reason or q.shape[0] == 0 or k.shape[0] == 0:
        return sdpa.reference_block('flash_attn', reason, q, k, v, cu_seq_lens_q, cu_seq_lens_k, causal, scale)
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward
    cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
    answer = _call(_flash_attn_varlen_forward, q, k, v, cu_q, cu_k, sdpa.longest(cu_q), sdpa.longest(cu_k),
                   dropout_p=0.0, softmax_scale=scale, causal=causal)
    out = answer[0]
    lse = next(t for t in answer[1:] if isinstance(t, torch.Tensor) and tuple(t.shape) == (q.shape[1], q.shape[0]))
    return sdpa.without_empty_keys(out.float(), lse.transpose(0, 1).float(), cu_seq_lens_q, cu_seq_lens_k)


def varlen_attention_lse_backward(grad_out, q, k, v, out, lse, cu_seq_lens_q, cu_seq_lens_k, causal: bool,
                                  scale: float):
    """``_flash_attn_varlen_backward`` fed the merged output and log-sum-exp (as the CPU backend)."""
    reason = block_unsupported(q, cu_seq_lens_q, cu_seq_lens_k, causal, 'flash-attn')
    if reason or q.shape[0] == 0 or k.shape[0] == 0:
        return sdpa.reference_block_backward('flash_attn', reason, grad_out, q, k, v, out, lse, cu_seq_lens_q,
                                             cu_seq_lens_k, causal, scale)
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward
    cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.float().masked_fill(lse == float('-inf'), float('inf'))  # queries with no key: P = 0
    _call(_flash_attn_varlen_backward, grad_out.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(),
          lse.transpose(0, 1).contiguous(), dq, dk, dv, cu_q, cu_k, sdpa.longest(cu_q), sdpa.longest(cu_k),
          dropout_p=0.0, softmax_scale=scale, causal=causal)
    return dq, dk, dv
