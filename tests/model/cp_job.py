"""TransformersModel under context parallelism on the tiny Qwen3, and its one-process twin (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=N -m tests.model.cp_job OUT_DIR CP ULYSSES \
        [FSDP EP MODEL]

N = CP x ULYSSES x FSDP x EP (all 1 on one process: the twin); MODEL 'dense' (tiny Qwen3, default)
or 'moe' (tiny Qwen3-MoE). Data ranks (fsdp, ep) read their slice of each batch. Per layout (padded
rows, packed rows): five training steps on batches of uneven samples (one of 1 token, shorter than the shards; others
crossing the zigzag chunk boundaries), recording each step's loss and the first step's gradients
(whole tensors, after the token normalisation), then the logits of a probe batch. Forward
pre-hooks on every attention module record the sequence length it received. Each rank saves
``OUT_DIR/rank<r>.pt``; logits come with the row token each local slot holds (-1: a pad).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

LENGTHS = [(13, 1, 6, 9), (7, 12, 1, 4), (11, 3, 1, 8), (5, 14, 2, 9), (1, 1, 12, 6)]  # per step: samples' lengths
PROBE = (10, 1, 5)
VOCAB = 256


def features(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=generator).tolist()
        prompt = n // 3
        rows.append({'input_ids': ids, 'labels': [-100] * prompt + ids[prompt:]})
    return rows


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, 'full_tensor') else tensor


def tiny_config(model: str):
    from transformers import Qwen3Config, Qwen3MoeConfig
    sizes = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16)
    if model == 'moe':
        return Qwen3MoeConfig(**sizes, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return Qwen3Config(**sizes, intermediate_size=96, tie_word_embeddings=True)


def run_layout(mesh, padding_free: bool, model_kind: str) -> dict:
    from twinkle.model import TransformersModel
    config = tiny_config(model_kind)
    torch.manual_seed(0)
    model = TransformersModel(config=config, device_mesh=mesh, mixed_precision='fp32')
    model.set_processor('InputProcessor', padding_free=padding_free)
    model.set_optimizer('AdamW', lr=1e-2)
    seen = []
    for module in model.model.modules():
        if type(module).__name__.endswith('Attention'):
            module.register_forward_pre_hook(
                lambda _, args, kwargs: seen.append((kwargs.get('hidden_states', args[0] if args else None)).shape[1]),
                with_kwargs=True)
    result = {'losses': [], 'seen': seen}
    for step, lengths in enumerate(LENGTHS):
        model.forward_backward(inputs=features(lengths, seed=step)[mesh.data_rank::mesh.data_world_size])
        model.clip_grad_norm(max_grad_norm=1e9)  # finalises (token-normalises) the gradients; clips nothing
        if step == 0:
            result['grads'] = {name: full(p.grad).clone() for name, p in model.model.named_parameters()}
        model.step()
        model.zero_grad()
        result['losses'].append(model.calculate_metric()['loss'])
    probe = features(PROBE, seed=99)
    batch = model._batches(probe)[0]
    context = batch.get('twinkle_context_parallel')
    result['probe_logits'] = model.forward_only(inputs=probe).logits.detach()
    result['probe_source'] = context.shards.source[mesh.sequence_rank] if context else None
    result['ep_rank'] = mesh.coordinate().get('ep', 0)
    return result


def main(out: str, cp: str, ulysses: str, fsdp: str = '1', ep: str = '1', model: str = 'dense') -> None:
    import twinkle
    from twinkle import DeviceMesh
    mesh = DeviceMesh.from_sizes(cp_size=int(cp), ulysses_size=int(ulysses), fsdp_size=int(fsdp), ep_size=int(ep))
    twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=120)
    results = {'padded': run_layout(mesh, False, model), 'packed': run_layout(mesh, True, model)}
    torch.save(results, Path(out) / f'rank{os.environ.get("RANK", "0")}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
