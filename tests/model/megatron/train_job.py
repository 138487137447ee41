"""MegatronModel and TransformersModel trained on the same data: 5 steps of the seeds' loop.

    python -m tests.model.megatron.train_job OUT MODEL SIZES              (one process: both adapters)
    torchrun --nproc_per_node=N -m tests.model.megatron.train_job OUT MODEL SIZES   (MegatronModel only)

SIZES is like ``tp=2,dp=1``. Each rank saves OUT/rank<r>.pt: losses, grad norms, trained tokens,
parameters held, and (rank 0) the logits of a probe batch after training.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import twinkle
from twinkle import DeviceMesh, assets
from twinkle.model import TransformersModel
from twinkle.model.megatron import MegatronModel

STEPS, BATCH, SEQ, LR = 5, 4, 12, 1e-3


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


def train(model, steps, micro_batch_size=None):
    model.set_optimizer('default', lr=LR)
    model.set_lr_scheduler('default', lr_decay_steps=STEPS, max_lr=LR)
    losses, norms = [], []
    for rows in steps:
        model.forward_backward(inputs=rows, micro_batch_size=micro_batch_size)
        norms.append(model.clip_grad_and_step(max_grad_norm=1.0))
        losses.append(model.calculate_metric(is_training=True)['loss'])
    return {'loss': losses, 'grad_norm': norms}


def probe(model, vocab):
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))
    return model.forward_only(inputs={'input_ids': ids, 'position_ids': torch.arange(SEQ).expand(2, SEQ)}).logits


def main(out: str, name: str, sizes: str) -> None:
    out_dir = Path(out)
    parsed = {key: int(value) for key, value in (item.split('=') for item in sizes.split(',') if item)}
    mesh = DeviceMesh.from_sizes(**{f'{key}_size': value for key, value in parsed.items()})
    path = assets.tiny_model_path(name)
    distributed = mesh.world_size > 1
    if distributed:
        twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=120)
    torch.manual_seed(0)
    model = MegatronModel(model_id=path, device_mesh=mesh)
    vocab = model.hf_config.vocab_size
    result = {'megatron': train(model, batches(vocab, mesh.data_rank, mesh.data_world_size), micro_batch_size=1),
              'parameters': sum(p.numel() for p in model.model.parameters())}
    if mesh.size('pp') == 1:  # forward_only through the pipeline is not built yet
        logits = probe(model, vocab)
        if not distributed or dist.get_rank() == 0:
            result['logits'] = logits
    model.save('saved', output_dir=str(out_dir))
    model.close()
    if not distributed:
        hf = TransformersModel(model_id=path, mixed_precision='fp32')
        result['transformers'] = train(hf, batches(vocab, 0, 1))
        result['transformers_parameters'] = sum(p.numel() for p in hf.model.parameters())
        result['transformers_logits'] = probe(hf, vocab)
    rank = dist.get_rank() if distributed else 0
    torch.save(result, out_dir / f'rank{rank}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
