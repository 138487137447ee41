"""Expert parallelism on 2 CPU processes (gloo): the Qwen3-MoE block forward + backward with EP=2
against the same block with all experts local, and the bytes each rank sends in dispatch against
the minimum (routed rows x hidden x dtype size: no capacity padding, no duplicate rows).

    python benchmarks/bench_expert_parallel.py [--quick]

Each rank routes its own tokens (as data ranks do). The local run is timed first on every rank, in
the same processes, so both share the host's load; the two processes share the 2 cores, so the
times show compute plus gloo's copies, not what a network would cost. Writes
``results/training/expert_parallel[-quick].json`` and the section in RESULTS.md.
"""
from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import whole_job_main

RANKS, REPS = 2, 3
SHAPES = {'default': dict(tokens=4096, hidden=1024, intermediate=512, experts=64, top_k=8),
          'quick': dict(tokens=512, hidden=256, intermediate=128, experts=16, top_k=4)}


def moe_block(shape: dict) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from twinkle.kernels import kernelize
    config = Qwen3MoeConfig(hidden_size=shape['hidden'], moe_intermediate_size=shape['intermediate'],
                            num_experts=shape['experts'], num_experts_per_tok=shape['top_k'], norm_topk_prob=True)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=config.initializer_range)
    return kernelize(block)


def best_ms(block: torch.nn.Module, hidden: torch.Tensor) -> float:
    """Fastest of REPS forward + backward passes (after one warm-up), every rank in step."""
    times = []
    for rep in range(REPS + 1):
        dist.barrier()
        started = time.perf_counter()
        block(hidden).sum().backward()
        times.append(1e3 * (time.perf_counter() - started))
        block.zero_grad(set_to_none=True)
    return min(times[1:])


def rank_main(rank: int, shape: dict, init_file: str, out: str) -> None:
    from twinkle import DeviceMesh
    from twinkle.parallel import apply_expert_parallel, count_dispatched_bytes
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(RANKS))
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=RANKS)
    hidden = torch.randn(1, shape['tokens'], shape['hidden'], generator=torch.Generator().manual_seed(rank))
    local_ms = best_ms(moe_block(shape), hidden)
    block = apply_expert_parallel(moe_block(shape), DeviceMesh.from_sizes(ep_size=RANKS))
    ep_ms = best_ms(block, hidden)
    with count_dispatched_bytes(block) as dispatched:  # one more pass, counted; the timed ones are not
        block(hidden).sum().backward()
    sent = dispatched.total / dispatched.calls
    minimum = shape['tokens'] * shape['top_k'] * shape['hidden'] * hidden.element_size()
    torch.save({'local_ms': local_ms, 'ep_ms': ep_ms, 'sent_bytes': sent, 'minimum_bytes': minimum},
               Path(out) / f'rank{rank}.pt')
    dist.destroy_process_group()


def measure(quick: bool) -> dict:
    shape = SHAPES['quick' if quick else 'default']
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(shape, os.path.join(out, 'init'), out), nprocs=RANKS)
        ranks = [torch.load(Path(out) / f'rank{rank}.pt') for rank in range(RANKS)]
    return {
        'date': datetime.datetime.now().isoformat(timespec='minutes'), 'machine': platform.processor() or 'cpu',
        'torch': torch.__version__, 'load_average': round(os.getloadavg()[0], 1), 'shape': shape, 'ranks': ranks,
        'dispatch_bytes_ratio': [r['sent_bytes'] / r['minimum_bytes'] for r in ranks],
    }


def main(argv=None) -> dict:
    result = whole_job_main('expert_parallel', __doc__.splitlines()[0], measure, argv)
    for rank, figures in enumerate(result['ranks']):
        print(f"rank {rank}: all experts local {figures['local_ms']:.0f} ms, EP=2 {figures['ep_ms']:.0f} ms; "
              f"dispatch sent {figures['sent_bytes'] / 2**20:.1f} MiB = "
              f"{result['dispatch_bytes_ratio'][rank]:.3f}x the minimum", flush=True)
    return result


if __name__ == '__main__':
    main()
