"""Long sequences with context parallelism: the tiny Qwen3 trained on 4k-token sequences, each split
over the ranks (zigzag shards, ring attention over cp, Ulysses over ulysses; FSDP2 over all).

    python -m torch.distributed.run --standalone --nproc_per_node=2 examples/long_context.py --cp-size 2
    make train NPROC=2 CP_SIZE=2       # the same (ULYSSES_SIZE=2 too); NPROC=1: one process, to compare

Every rank holds length / (cp x ulysses) tokens of each sequence, so the activations of a step
shrink with the ranks (attention's K/V travel around the ring instead of being gathered). It prints
the loss per step and the peak memory a training step adds per rank (CPU: over the process's
resident set before the step; accelerators: the allocator's peak), the number context
parallelism exists for.
"""
import argparse
import ctypes
import gc
import os

import torch

import twinkle
from twinkle import DeviceMesh, assets
from twinkle.model import TransformersModel


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=None, help='model id or path (default: embedded tiny Qwen3)')
    parser.add_argument('--cp-size', type=int, default=None, help='ring-attention ranks (default: all ranks '
                                                                   'not given to --ulysses-size)')
    parser.add_argument('--ulysses-size', type=int, default=1, help='Ulysses ranks (must divide the heads)')
    parser.add_argument('--length', type=int, default=4096, help='tokens per sequence')
    parser.add_argument('--steps', type=int, default=3)
    return parser.parse_args()


def build_mesh(cp_size, ulysses_size) -> DeviceMesh:
    """cp x ulysses over the ranks, FSDP over what is left."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    cp_size = cp_size or max(world_size // ulysses_size, 1)
    if world_size % (cp_size * ulysses_size):
        raise ValueError(f'--cp-size {cp_size} x --ulysses-size {ulysses_size} must divide the {world_size} ranks')
    return DeviceMesh.from_sizes(world_size=world_size, cp_size=cp_size, ulysses_size=ulysses_size,
                                 fsdp_size=world_size // (cp_size * ulysses_size))


def sequence(length: int, vocab: int, step: int) -> dict:
    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(step)).tolist()
    return {'input_ids': ids, 'labels': ids}


def step_peak(device, action) -> int:
    """Bytes a call adds at its peak over what the process held before it."""
    gc.collect()
    if device.type == 'cpu':
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # freed pages back to the OS: the resident set is the baseline
    device.reset_peak_memory()
    before = device.peak_memory()
    action()
    return device.peak_memory() - before


def main():
    args = parse_args()
    mesh = build_mesh(args.cp_size, args.ulysses_size)
    device = twinkle.initialize(seed=0, global_device_mesh=mesh)
    model = TransformersModel(model_id=args.model or assets.tiny_model_path('qwen3'), mixed_precision='fp32')
    model.set_optimizer('AdamW', lr=1e-3)
    vocab = model.model.config.vocab_size
    losses, peaks = [], []
    for step in range(args.steps):
        def train_step(step=step):
            model.forward_backward(inputs=[sequence(args.length, vocab, step)])
            model.clip_grad_and_step()
        peaks.append(step_peak(device, train_step))
        losses.append(model.calculate_metric()['loss'])
    peak = max(peaks[1:] or peaks)  # the first step also allocates the optimizer state
    per_rank = [None] * mesh.world_size
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(per_rank, peak)
    else:
        per_rank = [peak]
    if mesh.rank == 0:
        print(f'{mesh.describe_sizes()}: {args.length} tokens per sequence, '
              f'{args.length // mesh.sequence_world_size}+ per rank; loss per step: '
              + ', '.join(f'{loss:.4f}' for loss in losses))
        print('peak memory a training step adds, per rank: '
              + ', '.join(f'{value / 2**20:.1f} MiB' for value in per_rank))


if __name__ == '__main__':
    main()
