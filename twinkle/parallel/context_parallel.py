"""Attention over a sequence split across ranks: Ulysses, ring attention, and both (USP).

Every rank holds its zigzag shard of each row (``sequence_shards``). ``context_parallel_attention``
computes exact causal attention of the whole sequences from those shards:

- **Ulysses** (``ulysses`` ranks): one all-to-all trades the sequence split for a head split, so
  each rank holds its cp rank's whole shard for ``heads / ulysses`` heads; attention runs there,
  and the reverse all-to-all brings the outputs back. Query heads must divide by the size (else a
  clear error); key/value heads that do not (grouped-query attention with fewer kv heads than
  ranks) are replicated first, each rank getting the kv head its query heads use, when the size is
  a multiple of them; gradients of the copies add up.
- **Ring attention** (``cp`` ranks): K/V travel around the ring, each rank attending its queries
  to every rank's keys in turn; the partial outputs merge by their log-sum-exp (online softmax),
  in fp32, rounded once. With zigzag chunks (early chunk r, late chunk 2cp-1-r), the block from
  rank s is: causal on its own tokens (s = r), all queries against the early key chunks (s < r),
  the late query chunks against all keys (s > r): whole blocks, no token mask. The backward goes
  around the same ring: K/V again, and the gradients of their keys follow them home (cp - 1 hops); each
  block's gradients come from the merged output and log-sum-exp (flash attention's backward).

Ring blocks (and Ulysses alone, as a ring of one) run on ``varlen_attention_lse`` (torch's fused
CPU flash kernel on CPU, no scores held; the reference elsewhere), so padded, packed and padded
packed rows attend within their sequences only. Each exchange is a named collective.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from twinkle.kernels.varlen_attention import varlen_attention_lse, varlen_attention_lse_backward

from .collectives import collective
from .sequence_shards import SequenceShards


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shards: SequenceShards, *,
                               scale: Optional[float] = None, cp_group=None, ulysses_group=None) -> torch.Tensor:
    """Causal attention of this rank's shard: ``query`` ``(rows, local_length, heads, dim)``,
    ``key``/``value`` ``(rows, local_length, kv_heads, dim)`` as laid out by ``shards`` (this rank
    at ``cp_group``'s and ``ulysses_group``'s own ranks; None: size 1). Returns the output of the
    shard's queries, shaped like ``query``."""
    cp, ulysses = _group_size(cp_group), _group_size(ulysses_group)
    if (cp, ulysses) != (shards.cp, shards.ulysses):
        raise ValueError(f'shards are laid out for cp={shards.cp} x ulysses={shards.ulysses}, but the groups '
                         f'have cp={cp} x ulysses={ulysses} ranks')
    for name, tensor in (('query', query), ('key', key), ('value', value)):
        if tensor.dim() != 4 or tuple(tensor.shape[:2]) != (shards.rows, shards.local_length):
            raise ValueError(f'{name} must be (rows, local_length, heads, dim) with (rows, local_length) = '
                             f'{(shards.rows, shards.local_length)}, got {tuple(tensor.shape)}')
    if key.shape != value.shape:
        raise ValueError(f'key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}')
    replicas = ulysses_kv_replicas(query.shape[2], key.shape[2], ulysses)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if replicas > 1:
        key, value = (t.repeat_interleave(replicas, dim=2) for t in (key, value))
    if ulysses > 1:
        query, key, value = (_UlyssesAllToAll.apply(t, ulysses_group, True) for t in (query, key, value))
    rows, length = query.shape[:2]
    q, k, v = (t.reshape(rows * length, *t.shape[2:]) for t in (query, key, value))
    # cp = 1 too: one block through the fused lse kernel holds no scores (varlen_attention's CPU sdpa would)
    out = _RingAttention.apply(q, k, v, shards.cu_seq_lens, shards.cu_half, shards.first, shards.second,
                               float(scale), cp_group)
    out = out.to(query.dtype).reshape(rows, length, *out.shape[1:])
    return _UlyssesAllToAll.apply(out, ulysses_group, False) if ulysses > 1 else out


def ulysses_kv_replicas(heads: int, kv_heads: int, ulysses: int) -> int:
    """How many copies of each key/value head Ulysses needs so that every rank gets whole kv
    heads matching its query heads: 1 when ``ulysses`` divides ``kv_heads``, ``ulysses / kv_heads``
    when it is a multiple of them; any other split is an error."""
    if heads % ulysses:
        raise ValueError(f'ulysses_size={ulysses} must divide the {heads} attention heads (Ulysses gives each '
                         f'rank heads / ulysses_size of them); use a size that divides {heads}, or cp_size')
    if kv_heads % ulysses == 0:
        return 1
    if ulysses % kv_heads == 0:
        return ulysses // kv_heads
    raise ValueError(f'ulysses_size={ulysses} and the {kv_heads} key/value heads: one must divide the other '
                     f'(kv heads are split, or replicated when fewer than the ranks)')


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class _UlyssesAllToAll(torch.autograd.Function):
    """``to_heads``: (rows, L, H, D) sequence pieces -> (rows, ulysses x L, H / ulysses, D), the
    rank's cp shard for its head group; otherwise the reverse. The gradient takes the other trip."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return _ulysses_swap(x, group, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _ulysses_swap(grad.contiguous(), ctx.group, not ctx.to_heads), None, None


def _ulysses_swap(x: torch.Tensor, group, to_heads: bool) -> torch.Tensor:
    ranks = dist.get_world_size(group)
    rows, length, heads, dim = x.shape
    if to_heads:  # send head group j to rank j; receive every rank's piece of my head group
        send = x.reshape(rows, length, ranks, heads // ranks, dim).permute(2, 0, 1, 3, 4)
    else:         # send sequence piece j to rank j; receive my piece of every rank's head group
        send = x.reshape(rows, ranks, length // ranks, heads, dim).permute(1, 0, 2, 3, 4)
    send = send.contiguous()
    received = torch.empty_like(send)
    with collective('ulysses_all_to_all' if to_heads else 'ulysses_all_to_all_back'):
        dist.all_to_all_single(received, send, group=group)
    if to_heads:  # (ranks, rows, L, H/ranks, D) -> (rows, ranks x L, H/ranks, D)
        return received.permute(1, 0, 2, 3, 4).reshape(rows, ranks * length, heads // ranks, dim)
    return received.permute(1, 2, 0, 3, 4).reshape(rows, length // ranks, ranks * heads, dim)


def _ring_block(source: int, rank: int, cu, cu_half, first, second):
    """How this rank's zigzag queries meet rank ``source``'s keys: (query rows, key rows: None for
    all, cu_seq_lens of those queries and keys, causal)."""
    if source == rank:
        return None, None, cu, cu, True
    if source < rank:  # its early chunks come before both of ours; its late ones after both
        return None, first, cu, cu_half, False
    return second, None, cu_half, cu, False  # only our late chunks see it


def _rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    return t if rows is None else t[rows]


class _Ring:
    """Sends to the next rank of ``group`` and receives from the previous one, overlapped with compute."""

    def __init__(self, group):
        """``group`` None: a ring of one (Ulysses alone), which never exchanges."""
        self.group, self.rank, self.size = group, 0, 1
        if group is None:
            return
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.previous = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensor: torch.Tensor, name: str, tag: int = 0):
        """``tag`` keeps two trips in flight at once (K/V and their gradients) apart."""
        received = torch.empty_like(tensor)
        with collective(name):
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, tensor.contiguous(), self.next, self.group, tag),
                dist.P2POp(dist.irecv, received, self.previous, self.group, tag)])
        return name, works, received

    @staticmethod
    def finish(started) -> torch.Tensor:
        name, works, received = started
        with collective(name):
            for work in works:
                work.wait()
        return received


class _RingAttention(torch.autograd.Function):
    """Ring attention over flattened tokens: q (T, H, D), k/v (T, kv_heads, D) of this cp rank."""

    @staticmethod
    def forward(ctx, q, k, v, cu, cu_half, first, second, scale, group):
        ring = _Ring(group)
        out = q.new_zeros(q.shape, dtype=torch.float32)
        lse = q.new_full(q.shape[:2], float('-inf'), dtype=torch.float32)
        kv = torch.stack([k, v])
        for step in range(ring.size):
            started = ring.start(kv, f'ring_attention_forward step {step}') if step < ring.size - 1 else None
            rows, keys, cu_q, cu_k, causal = _ring_block((ring.rank - step) % ring.size, ring.rank, cu, cu_half,
                                                         first, second)
            block_out, block_lse = varlen_attention_lse(_rows(q, rows), _rows(kv[0], keys), _rows(kv[1], keys),
                                                        cu_q, cu_k, causal=causal, scale=scale)
            _merge(out, lse, rows, block_out, block_lse)
            if started is not None:
                kv = _Ring.finish(started)
        ctx.save_for_backward(q, k, v, out, lse, cu, cu_half, first, second)
        ctx.scale, ctx.group = scale, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """Own block first: its key gradients stay home. The gradients of each other rank's keys
        start where they are first computed and follow the K/V around the ring, arriving home
        after cp - 1 hops (one per step, overlapped with the next block), the fewest possible."""
        q, k, v, out, lse, cu, cu_half, first, second = ctx.saved_tensors
        ring = _Ring(ctx.group)
        grad_out = grad_out.float()
        grad_q = torch.zeros_like(q, dtype=torch.float32)
        kv, travelling, grad_home = torch.stack([k, v]), None, None
        for step in range(ring.size):
            started = ring.start(kv, f'ring_attention_backward step {step}') if step < ring.size - 1 else None
            rows, keys, cu_q, cu_k, causal = _ring_block((ring.rank - step) % ring.size, ring.rank, cu, cu_half,
                                                         first, second)
            dq, dk, dv = varlen_attention_lse_backward(
                _rows(grad_out, rows), _rows(q, rows), _rows(kv[0], keys), _rows(kv[1], keys), _rows(out, rows),
                _rows(lse, rows), cu_q, cu_k, causal=causal, scale=ctx.scale)
            if rows is None:
                grad_q += dq.float()
            else:
                grad_q.index_add_(0, rows, dq.float())
            grad_kv = (_Ring.finish(travelling) if step > 1 else
                       torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device))
            if keys is None:
                grad_kv += torch.stack([dk, dv]).float()
            else:
                grad_kv.index_add_(1, keys, torch.stack([dk, dv]).float())
            if step == 0:
                grad_home = grad_kv
            else:
                travelling = ring.start(grad_kv, f'ring_attention_backward grads step {step}', tag=1)
            if started is not None:
                kv = _Ring.finish(started)
        if travelling is not None:
            grad_home += _Ring.finish(travelling)
        return (grad_q.to(q.dtype), grad_home[0].to(k.dtype), grad_home[1].to(v.dtype),
                None, None, None, None, None, None)


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: Optional[torch.Tensor], block_out: torch.Tensor,
           block_lse: torch.Tensor) -> None:
    """Online softmax: fold a block's (output, log-sum-exp) into the running ones, in place."""
    old_out, old_lse = (out, lse) if rows is None else (out[rows], lse[rows])
    new_lse = torch.logaddexp(old_lse, block_lse)
    new_out = (old_lse - new_lse).exp()[..., None] * old_out + (block_lse - new_lse).exp()[..., None] * block_out
    if rows is None:
        out.copy_(new_out)
        lse.copy_(new_lse)
    else:
        out[rows], lse[rows] = new_out, new_lse


__all__ = ['context_parallel_attention', 'ulysses_kv_replicas']
