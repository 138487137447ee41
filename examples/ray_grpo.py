"""The seeds' Ray GRPO example (overview.md): a model group and a sampler group of Ray actors.

    python examples/ray_grpo.py                   # local Ray cluster: 2 model actors (FSDP) + 1 sampler
    python examples/ray_grpo.py --reward toy --steps 10

The same loop as examples/grpo.py (whose builders, rollout and training step it uses) with the
seeds' Ray set-up: ``twinkle.initialize(mode='ray', groups=[model, sampler])``, the model, the
sampler and the DataLoader built with ``remote_group=``, and ``CheckpointEngineManager`` syncing
the adapter from the model group's first rank to the sampler group over a process group of their
own. The driver holds proxies only: it sees global batches, and each call cuts them over the
group's data ranks. ``--check-sync`` compares, after the last sync, every synced tensor in the
sampler with the model's (bit for bit) and prints how many matched.
"""
import argparse
import functools
import sys

import torch

import twinkle
from twinkle import DeviceGroup, DeviceMesh, assets, get_device_placement
from twinkle.checkpoint_engine import CheckpointEngineManager, model_weights
from twinkle.dataloader import DataLoader

from grpo import build_model, build_sampler, create_dataset, parse_args, rollout, train_on


def parse_ray_args():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--model-ranks', type=int, default=2)
    parser.add_argument('--check-sync', action='store_true')
    ray_args, rest = parser.parse_known_args()
    sys.argv = sys.argv[:1] + rest
    args = parse_args()
    args.model_ranks, args.check_sync = ray_args.model_ranks, ray_args.check_sync
    return args


def adapter_weights(component, adapter_name):
    """The adapter's full tensors as this rank sees them (every model rank joins the FSDP gathers)."""
    return {name: tensor.clone() for name, tensor in model_weights(component, adapter_name)[1]}


def sampler_adapter(sampler, adapter_name):
    from peft import get_peft_model_state_dict
    return get_peft_model_state_dict(sampler.model, adapter_name=adapter_name)


def check_sync(model, sampler, adapter_name='default'):
    want = model.remote_apply(adapter_weights, adapter_name)[0]
    for got in sampler.remote_apply(sampler_adapter, adapter_name):
        mismatched = [name for name, tensor in want.items() if not torch.equal(got[name], tensor)]
        if mismatched or set(got) != set(want):
            raise SystemExit(f'sync check failed: {mismatched[:5]} differ, keys {sorted(set(got) ^ set(want))[:5]}')
    print(f'sync check: {len(want)} adapter tensors equal bit for bit in every sampler rank', flush=True)


def main():
    args = parse_ray_args()
    model_id = assets.tiny_model_path('qwen3')
    sampler_ranks = args.sampler_ranks
    device_groups = [
        DeviceGroup(name='model', ranks=list(range(args.model_ranks)), device_type='cpu'),
        DeviceGroup(name='sampler', ranks=list(range(args.model_ranks, args.model_ranks + sampler_ranks)),
                    device_type='cpu'),
    ]
    model_mesh = DeviceMesh.from_sizes(fsdp_size=args.model_ranks)
    sampler_mesh = DeviceMesh.from_sizes(world_size=sampler_ranks, dp_size=sampler_ranks)
    twinkle.initialize(mode='ray', nproc_per_node=args.model_ranks + sampler_ranks, groups=device_groups,
                       lazy_collect=False, seed=0, call_timeout=args.timeout)
    model = build_model(args, model_id, device_mesh=model_mesh, remote_group='model')
    sampler = build_sampler(model_id, device_mesh=sampler_mesh, remote_group='sampler')
    ckpt_manager = CheckpointEngineManager(model=model, sampler=sampler)
    dataloader = DataLoader(dataset=functools.partial(create_dataset, model_id), batch_size=args.batch_size,
                            device_mesh=model_mesh, remote_group='model')
    print(get_device_placement(model_mesh))
    curve = []
    while len(curve) < args.steps:
        for batch in dataloader:
            if len(curve) >= args.steps:
                break
            ckpt_manager.sync_weights(merge_and_sync=args.full)
            curve.append(train_on(args, model, rollout(args, sampler, batch), len(curve) + 1))
    if args.check_sync and not args.full:
        ckpt_manager.sync_weights()
        check_sync(model, sampler)
    print('rewards per step: ' + ', '.join(f'{value:.4f}' for value in curve))


if __name__ == '__main__':
    main()
