"""Context-parallel attention on the ranks of one job (gloo, CPU), and the cases it is checked on.

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.parallel.cp_attention_job OUT_DIR

Every rank runs each layout that fits the world size (ulysses=2, cp=2 on 2 ranks; ulysses=2 x
cp=2 on 4) on each case: its zigzag shard of the same global q, k, v, the output's gradient zero
on pads (as the loss is). It saves ``OUT_DIR/rank<r>.pt``: its shard's output and gradients per
(layout, case), and the errors of the bad inputs. The test reassembles the shards and compares
them with one process's attention over the whole sequences.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

# name -> (row length, per-row sequence lengths, heads, kv heads). Each has a sequence shorter
# than the shards (1 token) and sequences crossing the zigzag chunk boundaries.
CASES: Dict[str, Tuple[int, List[List[int]], int, int]] = {
    'padded': (13, [[13], [1], [6]], 4, 2),
    'packed': (24, [[1, 9, 3, 7]], 4, 2),
    'padded_packed': (11, [[5, 1, 3], [11]], 4, 2),
    'one_kv_head': (24, [[1, 9, 3, 7]], 4, 1),  # fewer kv heads than ulysses ranks: replicated
}
LAYOUTS = {2: [(1, 2), (2, 1)], 4: [(2, 2), (4, 1)]}  # world size -> (cp, ulysses); cp=4: gradients travel 3 hops
DIM = 8


def inputs(case: str):
    """q, k, v (rows, length, heads, dim) and the output's gradient, zero on padding."""
    length, lengths, heads, kv_heads = CASES[case]
    generator = torch.Generator().manual_seed(len(case))
    rows = len(lengths)
    q, k, v, grad = (torch.randn(rows, length, h, DIM, generator=generator) for h in (heads, kv_heads, kv_heads, heads))
    real = torch.tensor([[t < sum(row) for t in range(length)] for row in lengths])
    return q, k, v, grad * real[..., None, None]


def run_layout(mesh, cp: int, ulysses: int) -> dict:
    from twinkle.parallel.context_parallel import context_parallel_attention
    from twinkle.parallel.sequence_shards import shard_sequences
    where = mesh.coordinate()
    rank = where.get('cp', 0) * ulysses + where.get('ulysses', 0)
    groups = dict(cp_group=mesh.group('cp') if cp > 1 else None,
                  ulysses_group=mesh.group('ulysses') if ulysses > 1 else None)
    results = {}
    for case, (length, lengths, _, _) in CASES.items():
        shards = shard_sequences(lengths, length, cp=cp, ulysses=ulysses)
        q, k, v, grad = (shards.shard(t, rank).requires_grad_(i < 3) for i, t in enumerate(inputs(case)))
        out = context_parallel_attention(q, k, v, shards, **groups)
        out.backward(grad)
        results[case] = {'out': out.detach(), 'dq': q.grad, 'dk': k.grad, 'dv': v.grad,
                         'local_length': q.shape[1]}
    results['errors'] = bad_inputs(shard_sequences([[6]], 6, cp=cp, ulysses=ulysses), rank, groups)
    return results


def bad_inputs(shards, rank: int, groups) -> Dict[str, str]:
    from twinkle.parallel.context_parallel import context_parallel_attention
    from twinkle.parallel.sequence_shards import shard_sequences
    q = torch.zeros(1, shards.local_length, 4, DIM)
    attempts = {
        'heads': lambda: context_parallel_attention(torch.zeros(1, shards.local_length, 3, DIM), q[..., :1, :],
                                                    q[..., :1, :], shards, **groups),
        'layout': lambda: context_parallel_attention(q, q, q, shard_sequences([[6]], 6, cp=3), **groups),
        'shape': lambda: context_parallel_attention(q[:, :1], q[:, :1], q[:, :1], shards, **groups),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = ''
        except ValueError as error:
            errors[name] = str(error)
    return errors


def main(out: str) -> None:
    import twinkle
    from twinkle import DeviceMesh
    world_size = int(os.environ['WORLD_SIZE'])
    results = {}
    for cp, ulysses in LAYOUTS[world_size]:
        mesh = DeviceMesh.from_sizes(cp_size=cp, ulysses_size=ulysses, world_size=world_size)
        twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=60)
        results[f'cp{cp}_ulysses{ulysses}'] = run_layout(mesh, cp, ulysses)
    torch.save(results, Path(out) / f'rank{os.environ["RANK"]}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
