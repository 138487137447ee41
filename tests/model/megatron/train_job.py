"""MegatronModel and TransformersModel trained on the same data: 5 steps of the seeds' loop.

    python -m tests.model.megatron.train_job OUT MODEL SIZES MODE              (one process: both adapters)
    torchrun --nproc_per_node=N -m tests.model.megatron.train_job OUT MODEL SIZES MODE   (MegatronModel only)

SIZES is like ``tp=2,dp=1``; MODE is 'full' or 'lora' (LoRA r=4 on every projection LoRA takes on
MegatronModel) with any of: '+resume' for a resumed twin (saved with its optimizer after step
RESUME_AT, rebuilt, resumed, trained again to the end), '+megatron_ce' (kernels=None: Megatron's
own logits and cross-entropy instead of the fused head loss), '+bf16' (MegatronModel in bf16; the
TransformersModel reference stays fp32). Each rank saves OUT/rank<r>.pt: losses, grad norms,
parameters held, (rank 0) the logits of a probe batch after training; the adapter or full model is
saved to OUT/saved. In one process, TransformersModel trains from the same start (for LoRA it
loads MegatronModel's initial adapter, OUT/init).
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import twinkle
from twinkle import DeviceMesh, assets
from twinkle.model import TransformersModel
from twinkle.model.megatron import MegatronModel

STEPS, BATCH, SEQ, RESUME_AT = 5, 4, 12, 3
LR = {'full': 1e-3, 'lora': 1e-2}


def batches(vocab: int, data_rank: int, data_ranks: int):
    """Each step's global batch of BATCH rows (random lengths, a prompt not trained on); this data rank's share."""
    generator = torch.Generator().manual_seed(11)
    steps = []
    for _ in range(STEPS):
        rows = []
        for _ in range(BATCH):
            length = int(torch.randint(SEQ // 2, SEQ + 1, (1,), generator=generator))
            ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
            prompt = int(torch.randint(0, length // 2, (1,), generator=generator))
            rows.append({'input_ids': ids, 'labels': [-100] * prompt + ids[prompt:], 'attention_mask': [1] * length,
                         'position_ids': list(range(length))})
        steps.append(rows[data_rank::data_ranks])
    return steps


def lora_config(name: str):
    from peft import LoraConfig
    targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj']
    if not name.endswith('moe'):  # (an MoE model's experts take no LoRA on MegatronModel)
        targets += ['gate_proj', 'up_proj', 'down_proj']
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets)


def set_up(model, kind: str):
    model.set_optimizer('default', lr=LR[kind])
    model.set_lr_scheduler('default', lr_decay_steps=STEPS, max_lr=LR[kind])


def train(model, steps, micro_batch_size=None, checkpoint=None):
    """The seeds' loop over ``steps``; ``checkpoint`` (a path) is saved with the optimizer after RESUME_AT steps."""
    losses, norms = [], []
    for step, rows in enumerate(steps, start=1):
        model.forward_backward(inputs=rows, micro_batch_size=micro_batch_size)
        norms.append(model.clip_grad_and_step(max_grad_norm=1.0))
        losses.append(model.calculate_metric(is_training=True)['loss'])
        if checkpoint and step == RESUME_AT:
            model.save(checkpoint, save_optimizer=True)
    return {'loss': losses, 'grad_norm': norms}


def probe(model, vocab):
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))
    return model.forward_only(inputs={'input_ids': ids, 'position_ids': torch.arange(SEQ).expand(2, SEQ)}).logits


def megatron(path, name, mesh, kind, flags, out_dir):
    model = MegatronModel(model_id=path, device_mesh=mesh, mixed_precision='bf16' if 'bf16' in flags else 'fp32',
                          kernels=None if 'megatron_ce' in flags else 'auto')
    if kind == 'lora':
        model.add_adapter_to_model('default', lora_config(name))
        model.save('init', output_dir=str(out_dir))
    set_up(model, kind)
    return model


def main(out: str, name: str, sizes: str, mode: str) -> None:
    out_dir = Path(out)
    kind, *flags = mode.split('+')
    resume = 'resume' in flags
    parsed = {key: int(value) for key, value in (item.split('=') for item in sizes.split(',') if item)}
    mesh = DeviceMesh.from_sizes(**{f'{key}_size': value for key, value in parsed.items()})
    path = assets.tiny_model_path(name)
    distributed = mesh.world_size > 1
    if distributed:
        twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=120)
    torch.manual_seed(0)
    model = megatron(path, name, mesh, kind, flags, out_dir)
    vocab = model.hf_config.vocab_size
    steps = batches(vocab, mesh.data_rank, mesh.data_world_size)
    checkpoint = str(out_dir / 'resume') if resume else None
    result = {'megatron': train(model, steps, micro_batch_size=1, checkpoint=checkpoint),
              'parameters': sum(p.numel() for p in model.model.parameters())}
    result['loss_kind'] = model.get_train_configs()['loss']
    result['dtypes'] = sorted({str(p.dtype) for p in model.model.parameters()})
    result['optimizer'] = model.get_train_configs()['optimizer']
    if mesh.size('pp') == 1:  # forward_only through the pipeline is not built yet
        logits = probe(model, vocab)
        if not distributed or dist.get_rank() == 0:
            result['logits'] = logits
    model.save('saved', output_dir=str(out_dir))
    model.close()
    if resume:
        resumed = megatron(path, name, mesh, kind, flags, out_dir)
        resumed.load(checkpoint, load_optimizer=True)
        result['resumed'] = train(resumed, steps[RESUME_AT:], micro_batch_size=1)
        resumed.close()
    if not distributed:
        hf = TransformersModel(model_id=path, mixed_precision='fp32')
        if kind == 'lora':
            hf.add_adapter_to_model('default', lora_config(name))
            hf.load('init', output_dir=str(out_dir))
        set_up(hf, kind)
        result['transformers'] = train(hf, batches(vocab, 0, 1))
        result['transformers_parameters'] = sum(p.numel() for p in hf.model.parameters())
        result['transformers_logits'] = probe(hf, vocab)
    rank = dist.get_rank() if distributed else 0
    torch.save(result, out_dir / f'rank{rank}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
