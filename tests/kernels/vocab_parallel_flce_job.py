"""vocab_parallel_fused_linear_cross_entropy on the ranks of a tensor-parallel group (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.kernels.vocab_parallel_flce_job OUT_DIR

Every rank builds the same full LM head and tokens, takes its vocab shard, and saves to
``OUT_DIR/rank<r>.pt`` per scenario: the op's loss and gradients (hidden, its weight shard) next to
those of ``F.cross_entropy(hidden @ W_full.T)`` (the rows of W's gradient this rank holds); the
largest tensor any op produced during a call (a TorchDispatchMode sees every allocation); and
the errors of inputs the ranks disagree on. 2 ranks: the tokens, dtypes and reductions, a
one-rank group, memory, errors, a peer that never comes. 3 ranks: a vocabulary that does not divide, padded as Megatron
pads it (``vocab_size`` masks the padding rows), down to a shard of padding only.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import twinkle
from twinkle import DeviceMesh
from twinkle.kernels.fused_linear_cross_entropy import vocab_parallel as vp
from twinkle.kernels.fused_linear_cross_entropy.chunked import REDUCTIONS
from twinkle.parallel import CollectiveTimeout
from twinkle.kernels.fused_linear_cross_entropy import vocab_parallel_fused_linear_cross_entropy

HIDDEN = 33  # odd, like the token counts
MEMORY = dict(tokens=64, hidden_size=8, vocab=96, chunk=16)  # every other tensor is smaller than chunk x V_r


def make_case(shape, vocab: int, vocab_size: Optional[int] = None, hidden_size: int = HIDDEN,
              dtype=torch.float32, ignored: float = 0.3, seed: int = 0):
    """Hidden, the full (padded) head of ``vocab`` rows and labels in [0, vocab_size). Padding rows
    are large: were they not masked, they would take most of the probability."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.3
    weight[vocab_size or vocab:] *= 30
    labels = torch.randint(0, vocab_size or vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignored] = -100
    return hidden.to(dtype), weight.to(dtype), labels


def _upstream(loss: torch.Tensor) -> torch.Tensor:
    """A non-trivial upstream gradient (one per token for 'none'), the same on every rank."""
    return torch.linspace(0.5, 2.0, loss.numel()).view(loss.shape) if loss.dim() else torch.tensor(1.7)


def shard(weight: torch.Tensor, group) -> tuple:
    width = weight.shape[0] // dist.get_world_size(group)
    start = dist.get_rank(group) * width
    return weight[start:start + width], start


def run_op(case, group, vocab_size=None, wants=(True, True), **options) -> Dict[str, Optional[torch.Tensor]]:
    hidden, weight, labels = case
    weight_shard, start = shard(weight, group)
    hidden = hidden.detach().clone().requires_grad_(wants[0])
    weight_shard = weight_shard.detach().clone().requires_grad_(wants[1])
    loss = vocab_parallel_fused_linear_cross_entropy(hidden, weight_shard, labels, group=group, vocab_start=start,
                                                     vocab_size=vocab_size, **options)
    (loss * _upstream(loss)).sum().backward()
    return {'loss': loss.detach(), 'hidden_grad': hidden.grad, 'weight_grad': weight_shard.grad}


def run_reference(case, group, vocab_size=None, reduction='sum', ignore_index=-100, wants=(True, True),
                  **_) -> Dict[str, Optional[torch.Tensor]]:
    """F.cross_entropy over the full logits in fp32; 'mean' counts the non-ignored tokens (0 if none)."""
    hidden, weight, labels = (t.clone() for t in case)
    hidden = hidden.float().requires_grad_(wants[0])
    weight = weight.float().requires_grad_(wants[1])
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight[:vocab_size or weight.shape[0]].t()
    losses = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction='none')
    count = (labels != ignore_index).sum().clamp(min=1)
    loss = {'none': losses.view(labels.shape), 'sum': losses.sum(), 'mean': losses.sum() / count}[reduction]
    (loss * _upstream(loss)).sum().backward()
    weight_grad = None if weight.grad is None else shard(weight.grad, group)[0]
    return {'loss': loss.detach(), 'hidden_grad': hidden.grad, 'weight_grad': weight_grad}


def compare(case, group, **options) -> dict:
    return {'op': run_op(case, group, **options), 'reference': run_reference(case, group, **options),
            'dtype': str(case[0].dtype)}


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returned (every allocation is some op's output), and
    the GEMMs run."""

    def __init__(self):
        super().__init__()
        self.largest, self.shape, self.gemms = 0, (), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.gemms += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > self.largest:
                self.largest, self.shape = leaf.numel(), tuple(leaf.shape)
        return out


def largest_tensor(run) -> dict:
    with LargestTensor() as mode:
        run()
    return {'numel': mode.largest, 'shape': mode.shape, 'gemms': mode.gemms}


def memory(group) -> dict:
    """Forward and backward of the op with 16-row chunks, with the default sizing under a budget of
    16 rows, and of the reference (the negative control: it must show the N x V logits); the op's
    forward under no_grad (one GEMM a chunk, no gradients)."""
    case = make_case((MEMORY['tokens'],), MEMORY['vocab'], hidden_size=MEMORY['hidden_size'], ignored=0.0)
    result = {'chunk16': largest_tensor(lambda: run_op(case, group, chunk_size=MEMORY['chunk'])),
              'reference': largest_tensor(lambda: run_reference(case, group))}
    weight_shard, start = shard(case[1], group)
    with torch.no_grad():
        result['no_grad'] = largest_tensor(lambda: vocab_parallel_fused_linear_cross_entropy(
            case[0].clone().requires_grad_(), weight_shard.clone().requires_grad_(), case[2], group=group,
            vocab_start=start, chunk_size=MEMORY['chunk']))
    width = MEMORY['vocab'] // dist.get_world_size(group)
    budget = vp.CHUNK_BUDGET_BYTES
    vp.CHUNK_BUDGET_BYTES = MEMORY['chunk'] * width * 4  # fp32 logits of 16 rows
    try:
        result['budget16'] = largest_tensor(lambda: run_op(case, group, reduction='none'))
    finally:
        vp.CHUNK_BUDGET_BYTES = budget
    return result


def error_of(run) -> Optional[str]:
    try:
        run()
    except ValueError as error:
        return str(error)
    return None


def disagreements(group) -> dict:
    """Inputs the ranks disagree on: every rank must raise (none may wait in a collective)."""
    hidden, weight, labels = make_case((6,), 8, ignored=0.0)
    weight_shard, start = shard(weight, group)
    rank = dist.get_rank(group)

    def call(hidden=hidden, weight_shard=weight_shard, labels=labels, **options):
        options = {'vocab_start': start, **options}
        return lambda: vocab_parallel_fused_linear_cross_entropy(hidden, weight_shard, labels, group=group,
                                                                 **options)
    found = {
        'tokens': error_of(call(hidden[:5 + rank], labels=labels[:5 + rank])),  # a sequence-parallel shard
        'shard_rows': error_of(call(weight_shard=weight_shard[:4 - rank])),
        'overlap': error_of(call(vocab_start=0)),
        'gap': error_of(call(vocab_start=start * 2)),
        'vocab_size': error_of(call(vocab_size=9)),
        'reduction': error_of(call(reduction=REDUCTIONS[rank])),
        'other_labels_unchecked': error_of(call(labels=labels.roll(rank))),
    }
    loss = call(hidden.requires_grad_())()
    loss.backward(retain_graph=True)
    try:
        loss.backward()  # the gradients computed in forward were scaled in place by the first
    except RuntimeError as error:
        found['backward_twice'] = str(error)
    os.environ['TWINKLE_CHECK_VALUES'] = '1'  # value checks: the labels' fingerprint, their range
    try:
        found['other_labels'] = error_of(call(labels=labels.roll(rank)))
        found['label_range'] = error_of(call(labels=torch.full_like(labels, 8)))
    finally:
        del os.environ['TWINKLE_CHECK_VALUES']
    return found


def stalled_peer() -> Optional[str]:
    """Rank 1 never calls the op: rank 0's first collective in it must fail within the group's
    3 s timeout, naming the operation and rank 1 (this group is broken afterwards: the job's last use)."""
    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
    if dist.get_rank() == 1:
        return None
    hidden, weight, labels = make_case((6,), 8)
    try:
        vocab_parallel_fused_linear_cross_entropy(hidden, weight[:4], labels, group=short, vocab_start=0)
    except CollectiveTimeout as error:
        return str(error)
    return 'no error'


def job_two_ranks(group) -> dict:
    tokens = make_case((13,), 50)  # V_r = 25
    results = {f'{reduction}-chunk{chunk}': compare(tokens, group, reduction=reduction, chunk_size=chunk)
               for reduction in REDUCTIONS for chunk in (None, 4)}
    results['batched-none'] = compare(make_case((2, 7), 50), group, reduction='none', chunk_size=3)
    hidden, weight, labels = make_case((13,), 50, ignored=0.0, seed=1)
    labels[:4] = 0  # id 0 of rank 0's shard, ignored
    results['ignore-index-0'] = compare((hidden, weight, labels), group, ignore_index=0)
    for reduction in REDUCTIONS:
        results[f'all-ignored-{reduction}'] = compare(make_case((4,), 50, ignored=1.0), group, reduction=reduction)
        results[f'empty-{reduction}'] = compare(make_case((0,), 50), group, reduction=reduction)
        results[f'bf16-{reduction}'] = compare(make_case((13,), 50, dtype=torch.bfloat16), group,
                                               reduction=reduction, chunk_size=4)
        results[f'partial-hidden-grad-{reduction}'] = compare(tokens, group, reduction=reduction,
                                                              reduce_grad_hidden=False)
    results['frozen-weight'] = compare(tokens, group, wants=(True, False), reduction='mean')
    results['frozen-hidden'] = compare(tokens, group, wants=(False, True), reduction='none')
    singletons = [dist.new_group([rank]) for rank in range(dist.get_world_size())]  # every rank makes every group
    alone = singletons[dist.get_rank()]
    for reduction in REDUCTIONS:
        results[f'one-rank-{reduction}'] = compare(tokens, alone, reduction=reduction, chunk_size=5)
    return {'cases': results, 'memory': memory(group), 'errors': disagreements(group), 'stall': stalled_peer()}


def job_three_ranks(group) -> dict:
    results = {}
    for reduction in REDUCTIONS:  # V=10 padded to 12: shards of 4, rank 2 holds 2 real rows
        results[f'padded-{reduction}'] = compare(make_case((11,), 12, vocab_size=10, hidden_size=7), group,
                                                 vocab_size=10, reduction=reduction, chunk_size=4)
    results['padded-bf16-mean'] = compare(make_case((11,), 12, vocab_size=10, hidden_size=7, dtype=torch.bfloat16),
                                          group, vocab_size=10, reduction='mean')
    # V=5 padded to 12: rank 1 holds one real row, rank 2 only padding
    results['padding-shard-sum'] = compare(make_case((17,), 12, vocab_size=5, hidden_size=7, ignored=0.0), group,
                                           vocab_size=5, reduction='sum', chunk_size=6)
    results['divides-none'] = compare(make_case((9,), 12, hidden_size=7), group, reduction='none')
    return {'cases': results}


def main(out: str, job: str) -> None:
    world_size = int(os.environ['WORLD_SIZE'])
    mesh = DeviceMesh.from_sizes(tp_size=world_size)
    twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=60)
    result = globals()[f'job_{job}'](mesh.group('tp'))
    torch.save(result, Path(out) / f'rank{dist.get_rank()}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
