"""LoRA finetune of an embedded tiny model with MegatronModel (megatron-core), offline.

    make train BACKEND=megatron NPROC=4     # tiny Qwen3-MoE at tp=2 x ep=2, then tiny Qwen3 at tp=2 x pp=2

The seeds' shape: ``MegatronModel(model_id=..., device_mesh=...)``, ``add_adapter_to_model`` (a
peft LoraConfig; tensor-parallel LoRA), ``set_optimizer('default', lr=...)``,
``set_lr_scheduler('default', lr_decay_steps=..., max_lr=...)``, forward_backward with
``micro_batch_size``, clip_grad_and_step, calculate_metric, save (a peft adapter with Hugging Face
names that plain peft loads on one process; ``--full`` trains every weight and saves Hugging Face
safetensors). Tensor parallelism runs with sequence parallelism; pipeline parallelism through
megatron-core's 1F1B schedule (micro_batch_size=2: 4 micro-batches).
"""
import argparse
import os
import sys

# This file's name is megatron-core's package name: drop its folder from the import path, or
# `import megatron.core` would find this script instead.
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or '.') != os.path.dirname(os.path.abspath(__file__))]

import twinkle  # noqa: E402
from twinkle import DeviceMesh, assets  # noqa: E402
from twinkle.dataloader import DataLoader  # noqa: E402
from twinkle.dataset import Dataset, DatasetMeta  # noqa: E402
from twinkle.model.megatron import MegatronModel  # noqa: E402
from twinkle.preprocessor import SelfCognitionProcessor  # noqa: E402

SIZES = {'qwen3_moe': dict(tp_size=2, ep_size=2), 'qwen3': dict(tp_size=2, pp_size=2)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', choices=sorted(SIZES), default='qwen3_moe', help='embedded tiny model')
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--lr', type=float, default=None, help='default: 1e-2 for LoRA, 1e-3 with --full')
    parser.add_argument('--full', action='store_true', help='train every weight instead of a LoRA adapter')
    parser.add_argument('--output', default=None, help='default: outputs/megatron-<model>')
    return parser.parse_args()


def build_mesh(model: str) -> DeviceMesh:
    """The model's layout on 4 ranks; on another world size, tensor parallelism over all of them."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    sizes = SIZES[model] if world_size == 4 else dict(tp_size=world_size)
    return DeviceMesh.from_sizes(world_size=world_size, **sizes)


def main():
    args = parse_args()
    mesh = build_mesh(args.model)
    twinkle.initialize(seed=42, global_device_mesh=mesh)
    model_id = assets.tiny_model_path(args.model)
    dataset = Dataset(DatasetMeta(assets.self_cognition_path(), data_slice=range(args.steps * args.batch_size)))
    dataset.set_template('Qwen3_5Template', model_id=model_id, max_length=256)
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope Community'))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=args.batch_size)

    model = MegatronModel(model_id=model_id, device_mesh=mesh)
    if not args.full:  # all-linear on the MoE model: the attention projections (the experts take no LoRA here)
        from peft import LoraConfig
        model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
    lr = args.lr or (1e-3 if args.full else 1e-2)
    model.set_optimizer('default', lr=lr)
    model.set_lr_scheduler('default', lr_decay_steps=args.steps, max_lr=lr)
    losses = []
    for batch in dataloader:
        model.forward_backward(inputs=batch, micro_batch_size=2)
        model.clip_grad_and_step()
        losses.append(model.calculate_metric(is_training=True)['loss'])
    path = model.save(args.output or f'outputs/megatron-{args.model}')
    if int(os.environ.get('RANK', '0')) == 0:
        print(f'{args.model} on {mesh.describe_sizes()}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over '
              f'{len(losses)} steps; {"Hugging Face checkpoint" if args.full else "peft adapter"}: {path}')
    model.close()


if __name__ == '__main__':
    main()
