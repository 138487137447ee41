"""Fused linear cross-entropy over a vocabulary split across the ranks of a group (tensor parallel).

Each rank holds the LM-head rows ``[vocab_start, vocab_start + V_r)`` (Megatron's
ColumnParallelLinear output layer) and the same tokens. The chunk loop is ``chunked.py``'s; only
the per-chunk step differs: the chunk's local fp32 logits (chunk x V_r, the only V-wide buffer)
give each row's max, all-reduced with MAX over the group; then the local sum of exponentials and
the target logit (from the rank that owns the label, 0 elsewhere) are all-reduced together with
SUM, and ``loss = log(sum exp(l - max)) - (target - max)``. The gradient of the local logits is
``softmax_local - onehot_local``; ``dW_r = G^T h`` is this rank's alone, ``dH = G W_r`` is a
partial sum over the group's vocab shards. No rank holds more than chunk x V_r logits.

Communication per call: one all-gather of a few integers (every rank checks that the group agrees
on the shapes, so a mismatch is a ValueError on every rank instead of a hang), two all-reduces of
chunk-sized rows per chunk (again in backward for reduction='none', which recomputes), and for
``reduce_grad_hidden`` one all-reduce of dH (N x H, in hidden's dtype as Megatron does) in backward.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from twinkle.utils.labels import IGNORE_INDEX

from ..checks import check_values, require_head_inputs, require_ids_in_range, require_int
from .chunked import REDUCTIONS, _saved_gradients, _scaled, chunked_passes

# Not measured on a GPU: per rank the chunk is V / tp wide, so rows are cheaper than in the
# unsharded op; 2048 rows keep the GEMMs at full speed, the budget bounds the fp32 chunk logits.
MAX_ROWS = 2048
CHUNK_BUDGET_BYTES = 512 << 20
# the columns of _agreed_vocabulary's table after vocab_start: the argument at fault, what must agree
_AGREED = (('weight_shard', 'as many vocab rows (pad the vocabulary as Megatron does, and pass vocab_size)'),
           ('hidden', 'the same tokens (gather sequence-parallel hidden first): their count'),
           ('hidden', 'the same hidden size'), ('vocab_size', 'the same vocab_size (0: None)'),
           ('ignore_index', 'the same ignore_index'), ('reduction', 'the same reduction'),
           ('chunk_size', 'the same chunk_size (0: None)'),
           ('labels', 'the same labels (their fingerprint, with TWINKLE_CHECK_VALUES=1)'))
_FORWARD, _BACKWARD = ('vocab_parallel_fused_linear_cross_entropy forward',
                       'vocab_parallel_fused_linear_cross_entropy backward')


def vocab_parallel_fused_linear_cross_entropy(hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor,
                                              *, group, vocab_start: int, vocab_size: Optional[int] = None,
                                              ignore_index: int = IGNORE_INDEX, reduction: str = 'sum',
                                              chunk_size: Optional[int] = None,
                                              reduce_grad_hidden: bool = True) -> torch.Tensor:
    """Cross-entropy of ``hidden @ W.T`` against ``labels`` where ``W`` is split by vocab rows over ``group``.

    hidden (..., H): the SAME tokens on every rank of ``group`` (gather sequence-parallel hidden
    first); weight_shard (V_r, H): vocab rows ``[vocab_start, vocab_start + V_r)``, the same V_r
    on every rank, the shards tiling the (padded) vocabulary; labels (...) global ids.
    ``vocab_size``: the true vocabulary when the shards are padded past it (Megatron pads to a
    multiple of tp): rows >= vocab_size get no probability. ``group``: the tensor-parallel process
    group (None: the default group). Returns the fp32 loss, the same on
    every rank; 'mean' divides by the non-ignored tokens (0 when none), 'none' is labels' shape.

    Gradients: weight_shard's is this rank's shard. hidden's is a partial sum over the ranks;
    with ``reduce_grad_hidden`` (default) backward all-reduces it, so every rank gets the full
    gradient; pass False where the caller's own autograd op reduces it (Megatron's
    gather_from_sequence_parallel_region, whose backward reduce-scatters). The upstream gradient
    of the loss must be the same on every rank (it is when every rank uses the loss alike).

    Not a registry backend: an autograd Function whose collectives sit between its GEMMs, which it
    dispatches itself (PyTorch matmuls, the torch chunk step). Collectives run under the project's
    named timeout (``twinkle.parallel.collective``). It reads the host (the group's agreed shapes,
    the count of counted tokens), so torch.compile breaks the graph around it.
    """
    require_head_inputs(hidden, 'weight_shard', weight_shard, labels)
    if weight_shard.shape[0] < 1:
        raise ValueError('weight_shard must hold at least one vocab row, got shape (0, ...)')
    require_int('vocab_start', vocab_start, low=0)
    if vocab_size is not None:
        require_int('vocab_size', vocab_size, low=1)
    require_int('ignore_index', ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')
    if chunk_size is not None:
        require_int('chunk_size', chunk_size, low=1)
    if not isinstance(reduce_grad_hidden, bool):
        raise ValueError(f'reduce_grad_hidden must be a bool, got {reduce_grad_hidden!r}')
    if not dist.is_initialized():
        raise ValueError('group: torch.distributed is not initialised (twinkle.initialize under torchrun); '
                         'one process with the whole LM head uses fused_linear_cross_entropy')

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    width = weight_shard.shape[0]
    with _collective(_FORWARD):
        total = _agreed_vocabulary(group, flat_hidden, flat_labels, vocab_start, width, vocab_size, ignore_index,
                                   reduction, chunk_size)
        if check_values():
            require_ids_in_range('labels', flat_labels, vocab_size or total, ignore=ignore_index)
        real_width = width if vocab_size is None else min(max(vocab_size - vocab_start, 0), width)
        loss = _VocabParallelLoss.apply(flat_hidden, weight_shard, flat_labels, group, vocab_start, real_width,
                                        ignore_index, reduction, chunk_size, reduce_grad_hidden,
                                        torch.is_grad_enabled())
    return loss.view(labels.shape) if reduction == 'none' else loss


def _agreed_vocabulary(group, hidden: torch.Tensor, labels: torch.Tensor, vocab_start: int, width: int,
                       vocab_size: Optional[int], ignore_index: int, reduction: str,
                       chunk_size: Optional[int]) -> int:
    """The padded vocabulary the shards tile, after every rank has checked that the group agrees
    on what must be equal (else ranks would run different chunk loops and hang in them). Every
    rank sees the same table, so every rank raises the same error."""
    # with TWINKLE_CHECK_VALUES=1, also a fingerprint of the labels: the same tokens everywhere
    fingerprint = (int((labels * torch.arange(1, labels.numel() + 1, device=labels.device)).sum())
                   if check_values() else 0)
    mine = [vocab_start, width, hidden.shape[0], hidden.shape[1], vocab_size or 0, ignore_index,
            REDUCTIONS.index(reduction), chunk_size or 0, fingerprint]
    row = torch.tensor(mine, dtype=torch.int64, device=hidden.device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    table: List[List[int]] = torch.stack(rows).tolist()  # one host read per call
    for column, (argument, what) in enumerate(_AGREED, start=1):
        values = [r[column] for r in table]
        if len(set(values)) > 1:
            if argument == 'reduction':
                values = [REDUCTIONS[value] for value in values]
            raise ValueError(f'{argument}: every rank of the group must pass {what}, got {values} by group rank')
    starts = sorted(r[0] for r in table)
    if starts != [width * index for index in range(len(table))]:
        raise ValueError(f'vocab_start: the shards of {width} rows must tile [0, {width * len(table)}) '
                         f'without gaps or overlaps, got starts {[r[0] for r in table]} by group rank')
    total = width * len(table)
    if vocab_size is not None and vocab_size > total:
        raise ValueError(f'vocab_size={vocab_size} is larger than the {total} rows the shards hold')
    return total


class _VocabParallelLoss(torch.autograd.Function):
    """For 'mean'/'sum' the gradients come out of forward's chunk loop (three GEMMs a chunk) and
    backward scales them in place (so a second backward is refused); 'none' recomputes in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start, real_width, ignore_index, reduction, chunk_size,
                reduce_grad_hidden, grad_enabled):
        passes = chunked_passes(_step(group, vocab_start, real_width), MAX_ROWS, CHUNK_BUDGET_BYTES)
        # needs_input_grad says True under no_grad too: the caller's grad mode decides
        wanted = (grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1], False)
        loss, (d_hidden, d_weight, _) = passes.forward(hidden, weight, labels, None, ignore_index, reduction,
                                                       0.0, None, chunk_size, wanted)
        ctx.group, ctx.reduce_grad_hidden, ctx.wanted = group, reduce_grad_hidden, wanted[:2]
        ctx.weight_dtype = weight.dtype
        ctx.unreduced = reduction == 'none'
        if ctx.unreduced:
            ctx.passes, ctx.options = passes, (ignore_index, chunk_size)
            ctx.save_for_backward(hidden, weight, labels)
        else:
            ctx.save_for_backward(d_hidden, d_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        with _collective(_BACKWARD):
            if ctx.unreduced:
                hidden, weight, labels = ctx.saved_tensors
                ignore_index, chunk_size = ctx.options
                d_hidden, d_weight, _ = ctx.passes.unreduced_backward(grad_loss, hidden, weight, labels, None,
                                                                      ignore_index, 0.0, None, chunk_size,
                                                                      (*ctx.wanted, False))
            else:
                d_hidden, d_weight = (None if grad is None else _scaled(grad, grad_loss)
                                      for grad in _saved_gradients(ctx))
            if d_hidden is not None and ctx.reduce_grad_hidden and d_hidden.numel():
                dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return d_hidden, None if d_weight is None else d_weight.to(ctx.weight_dtype), *(None,) * 9


def _collective(operation: str):
    """``twinkle.parallel.collective``, imported here: twinkle.parallel imports the kernels."""
    from twinkle.parallel.collectives import collective
    return collective(operation)


def _step(group, vocab_start: int, real_width: int):
    """``chunked.ChunkStep`` over a vocab shard: the softmax's max and normaliser come from the
    whole group. Columns from ``real_width`` on are padding (-inf: no probability, no gradient)."""
    def step(logits, labels, want_grad, label_smoothing, softcap):
        if real_width < logits.shape[1]:
            logits[:, real_width:] = float('-inf')
        local = labels - vocab_start
        owned = (local >= 0) & (local < real_width)
        local = local.where(owned, 0).unsqueeze(1)
        row_max = logits.amax(1)  # -inf on a shard of padding only; the group's max is finite
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits.sub_(row_max.unsqueeze(1))
        target = torch.where(owned, shifted.gather(1, local).squeeze(1), 0.0)  # not 0 * -inf
        exps = shifted.exp_()
        sums = torch.stack([exps.sum(1), target])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        norm, target = sums
        if want_grad:
            exps.div_(norm.unsqueeze(1)).scatter_add_(1, local, -owned.to(exps.dtype).unsqueeze(1))
        return norm.log() - target
    return step


__all__ = ['vocab_parallel_fused_linear_cross_entropy']
