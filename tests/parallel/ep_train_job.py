"""Training with expert parallelism (EP=2 on 2 ranks, EP=2 x FSDP=2 on 4) against one process.

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.parallel.ep_train_job OUT_DIR [fsdp|dp]

Every rank also runs the single-process twin (stock Hugging Face MoE, whole global batch, same
seed) and stores, per checked quantity, its own value next to the part of the twin's value it
should hold (``shard_expert_state_dict`` cuts the twin's experts to this rank's slice). The EP
model starts from the twin's initial weights, LoRA included, cut the same way. Each rank saves
``OUT_DIR/rank<r>.pt``; full checkpoints go to ``OUT_DIR/<kind>_checkpoint``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ep_job import VOCAB, build_model, force_routing

SEQ, GLOBAL_BATCH, STEPS = 8, 8, 3
# SGD with momentum, not AdamW: what EP must preserve are gradients, and Adam's division by sqrt(v)
# turns fp32 rounding in near-zero gradient entries into visible update differences (measured with
# AdamW lr 1e-2: 2e-5 of a tensor's scale after 3 steps, on one process vs EP alike).
LR, MOMENTUM = 0.5, 0.9  # large steps: the weights move far beyond the tolerance
MAX_NORM = 0.5  # below the tiny model's gradient norms in full training: clipping acts there
LORA = dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'],
            target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'])
# forced: every token picks experts 0 and 1, so EP rank 1 gets none; bf16: full training with FSDP's
# bf16 compute policy (fp32 weights, gradients reduced in fp32) against the fp32 twin; kernelized_lora:
# LoRA on the kernelized model (twinkle's experts and ops; the other kinds keep HF's experts), twin
# kernelized too. Last: kernelize's RoPE replacement is process-wide.
KINDS = ('full', 'lora', 'forced', 'bf16', 'kernelized_lora')
LORA_KINDS = ('lora', 'kernelized_lora')


def batches() -> torch.Tensor:
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1234))


def build(kind: str) -> torch.nn.Module:
    model = build_model()
    if kind == 'forced':
        force_routing(model)
    if kind == 'kernelized_lora':
        from twinkle.kernels import kernelize
        kernelize(model)
    return model


def add_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(**LORA))
    for name, parameter in model.named_parameters():  # peft starts B at zero; make every factor matter
        if 'lora_B' in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def full_values(model: torch.nn.Module, of: Callable) -> Dict[str, torch.Tensor]:
    """{name: of(parameter)} with FSDP shards gathered (the EP slice stays this rank's)."""
    values = {}
    for name, parameter in model.named_parameters():
        value = of(parameter)
        if value is not None:
            value = value.detach()
            values[name] = (value.full_tensor() if hasattr(value, 'full_tensor') else value).clone()
    return values


def train(model, rows: slice, clip: Callable, reduce: Callable) -> dict:
    """STEPS of AdamW on the mean next-token loss over the global batch; this process sees ``rows``."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM)
    history = {'loss': [], 'grad_norm': []}
    for step, input_ids in enumerate(batches()):
        input_ids = input_ids[rows]
        logits = model(input_ids=input_ids).logits
        loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1), reduction='sum')
        (loss_sum / (GLOBAL_BATCH * (SEQ - 1))).backward()
        if step == 0:
            first = {'logits': logits.detach(), 'grads': full_values(model, lambda p: p.grad)}
        history['grad_norm'].append(float(clip(parameters, MAX_NORM)))
        history['loss'].append(float(reduce(loss_sum.detach())))
        optimizer.step()
        optimizer.zero_grad()
    return {**first, **history, 'weights': full_values(model, lambda p: p), 'optimizer': optimizer}


def single_process(kind: str) -> dict:
    model = build(kind)
    initial = add_lora(model) if kind in LORA_KINDS else model
    start = {name: p.detach().clone() for name, p in initial.named_parameters()}
    result = train(initial, slice(None), torch.nn.utils.clip_grad_norm_, lambda loss: loss)
    return {**result, 'start': start}


def expert_parallel(kind: str, mesh, twin: dict) -> dict:
    from twinkle.parallel import all_reduce_sum, apply_expert_parallel, clip_grad_norm_, parallelize
    from twinkle.parallel.expert_checkpoint import shard_expert_state_dict
    model = apply_expert_parallel(build(kind), mesh)
    if kind in LORA_KINDS:
        model = add_lora(model)
    model.load_state_dict(shard_expert_state_dict(model, twin['start']))
    model = parallelize(model, mesh, mixed_precision='bf16' if kind == 'bf16' else None)
    rows = slice(mesh.data_rank, None, mesh.data_world_size)
    result = train(model, rows, clip_grad_norm_, all_reduce_sum)
    expected_rows = twin['logits'][rows]
    compared = {'logits': (result['logits'].float(), expected_rows)}
    for what in ('grads', 'weights'):
        expected = shard_expert_state_dict(model, twin[what])
        compared.update({f'{what}:{name}': (value, expected[name]) for name, value in result[what].items()})
    return {'model': model, 'optimizer': result['optimizer'], 'compared': compared,
            'trajectory': {key: (result[key], twin[key]) for key in ('loss', 'grad_norm')},
            'trainable': sorted(name for name, p in model.named_parameters() if p.requires_grad)}


def resume_check(mesh, trained: dict, out: Path) -> Dict[str, tuple]:
    """Save the trained model and optimizer sharded, load them into a fresh model (other weights,
    no optimizer state): every weight and momentum must come back as saved (per EP rank's slice)."""
    from twinkle.parallel import apply_expert_parallel, load_sharded, parallelize, save_sharded
    save_sharded(str(out / 'sharded'), trained['model'], trained['optimizer'])
    fresh = parallelize(apply_expert_parallel(build_model(seed=5), mesh), mesh)
    optimizer = torch.optim.SGD(fresh.parameters(), lr=LR, momentum=MOMENTUM)
    load_sharded(str(out / 'sharded'), fresh, optimizer)
    saved_moments = _moments(trained['model'], trained['optimizer'])
    compared = {f'moment:{name}': (value, saved_moments[name]) for name, value in _moments(fresh, optimizer).items()}
    saved = full_values(trained['model'], lambda p: p)
    compared.update({f'weight:{name}': (value, saved[name]) for name, value in full_values(fresh, lambda p: p).items()})
    return compared


def adapter_reload_check(mesh, trained: dict, out: Path) -> Dict[str, tuple]:
    """The full LoRA checkpoint (every expert) loads into a fresh EP + FSDP model with another
    LoRA init: each rank gets back exactly the slices it trained."""
    from twinkle.model.transformers import checkpoint
    from twinkle.parallel import apply_expert_parallel, parallelize
    from twinkle.parallel.expert_checkpoint import shard_expert_state_dict
    torch.manual_seed(7)
    fresh = parallelize(add_lora(apply_expert_parallel(build_model(), mesh)), mesh)
    checkpoint.load(fresh, str(out / 'lora_checkpoint'), adapter='default',
                    prepare=lambda weights: shard_expert_state_dict(fresh, weights, 'default'))
    saved = full_values(trained['model'], lambda p: p if p.requires_grad else None)
    loaded = full_values(fresh, lambda p: p if p.requires_grad else None)
    return {name: (loaded[name], saved[name]) for name in saved}


def _moments(model, optimizer) -> Dict[str, torch.Tensor]:
    """The momentum of every parameter, FSDP shards gathered."""
    return full_values(model, lambda p: optimizer.state[p]['momentum_buffer'] if p in optimizer.state else None)


def main(out: str, other_dim: str = 'fsdp') -> None:
    """EP=2 times ``other_dim`` ('fsdp': experts sharded over fsdp; 'dp': HSDP, experts replicated)."""
    import twinkle
    from twinkle import DeviceMesh
    from twinkle.parallel import save_full_state_dict
    out = Path(out)
    mesh = DeviceMesh.from_sizes(ep_size=2, **{f'{other_dim}_size': int(os.environ['WORLD_SIZE']) // 2})
    twinkle.initialize(mode='local', global_device_mesh=mesh)
    results = {'placement': twinkle.get_device_placement()}
    for kind in KINDS:
        twin = single_process(kind)
        run = expert_parallel(kind, mesh, twin)
        save_full_state_dict(run['model'], str(out / f'{kind}_checkpoint'))
        if dist.get_rank() == 0:
            torch.save({name: twin['weights'][name] for name in run['trainable']}, out / f'{kind}_expected.pt')
        results[kind] = {key: run[key] for key in ('compared', 'trajectory')}
        if kind == 'full':
            results['resumed'] = resume_check(mesh, run, out)
        if kind == 'lora':
            results['adapter_reloaded'] = adapter_reload_check(mesh, run, out)
    torch.save(results, out / f'rank{dist.get_rank()}.pt')
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
