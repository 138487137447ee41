"""A tiny megatron-core GPTModel on 2 gloo ranks through the CPU shim, and its tp=1 twin.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.model.megatron.gpt_job OUT_DIR

Each rank first builds the model at tp=1 (Megatron groups for dp=2: the forward and backward touch
no other rank, so this is the one-process computation), records its logits, loss and gradients,
and destroys the groups. Then at tp=2 with sequence parallelism it loads the same weights, sharded
by hand, and records the gathered logits and its gradient shards; ``OUT_DIR/rank<r>.pt`` holds
both, with the shim's record, the RNG tracker's draws and Megatron's view of the groups.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

import twinkle
from twinkle import DeviceMesh
from twinkle.model.megatron import apply_cpu_shim, applied_patches, destroy_megatron_groups, initialize_megatron_groups

TIMEOUT = datetime.timedelta(seconds=60)
VOCAB, SEQ, BATCH, SEED = 128, 8, 2, 1234
# Megatron key suffix -> how a tp rank's slice is cut from the tp=1 tensor (anything else is replicated).
ROW_SPLIT = ('embedding.word_embeddings.weight', 'output_layer.weight',
             'self_attention.linear_qkv.weight')  # qkv: one query group (its q heads, k, v) per rank
COLUMN_SPLIT = ('self_attention.linear_proj.weight', 'mlp.linear_fc2.weight')
GATE_UP_SPLIT = ('mlp.linear_fc1.weight',)  # [gate; up], each half split on rows


def build_model(tp: int):
    """The tiny GPTModel MegatronModel would build (the bridge: megatron-core's local layer spec with
    norms that run sequence-parallel, which its own WrappedTorchNorm refuses)."""
    from transformers import Qwen3Config

    from twinkle.model.megatron import bridge
    hf_config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4 * SEQ,
                            tie_word_embeddings=False)
    return bridge.gpt_model(hf_config, bridge.transformer_config(hf_config, tp=tp, sequence_parallel=tp > 1))


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def forward_backward(model) -> Dict[str, object]:
    """Logits (vocab-sharded at tp > 1), the mean next-token loss and every parameter's gradient."""
    input_ids = tokens()
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(input_ids, position_ids, None).detach()
    labels = torch.roll(input_ids, -1, dims=1)
    loss = model(input_ids, position_ids, None, labels=labels).mean()
    loss.backward()
    return {'logits': logits, 'loss': loss.detach(),
            'grads': {name: param.grad.detach().clone() for name, param in model.named_parameters()}}


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    if name.endswith(ROW_SPLIT):
        return full.chunk(size, dim=0)[rank]
    if name.endswith(COLUMN_SPLIT):
        return full.chunk(size, dim=1)[rank]
    if name.endswith(GATE_UP_SPLIT):
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)])
    return full


def megatron_view() -> Dict[str, object]:
    """This rank's place as megatron-core sees it: its rank and group members per kind."""
    from megatron.core import parallel_state as ps
    kinds = {'tp': (ps.get_tensor_model_parallel_rank, ps.get_tensor_model_parallel_group),
             'pp': (ps.get_pipeline_model_parallel_rank, ps.get_pipeline_model_parallel_group),
             'cp': (ps.get_context_parallel_rank, ps.get_context_parallel_group),
             'dp': (ps.get_data_parallel_rank, ps.get_data_parallel_group),
             'ep': (ps.get_expert_model_parallel_rank, ps.get_expert_model_parallel_group)}
    return {kind: {'rank': rank(), 'members': dist.get_process_group_ranks(group())}
            for kind, (rank, group) in kinds.items()}


def rng_draws() -> Dict[str, torch.Tensor]:
    """Two forks of the tensor-parallel state and what the default CPU generator does meanwhile."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        first = torch.rand(4)
    untouched = torch.equal(torch.get_rng_state(), before)
    with get_cuda_rng_tracker().fork():
        second = torch.rand(4)
    return {'first': first, 'second': second, 'default_untouched': untouched}


def main(out: str) -> None:
    twinkle.initialize(global_device_mesh=DeviceMesh.from_sizes(tp_size=2), seed=0, timeout=TIMEOUT)
    rank = dist.get_rank()
    result = {'patches': apply_cpu_shim('cpu'), 'patches_again': apply_cpu_shim('cpu')}
    try:
        initialize_megatron_groups(DeviceMesh.from_sizes(tp_size=4), timeout=TIMEOUT)
    except ValueError as error:
        result['world_size_error'] = str(error)
    from megatron.core import parallel_state
    result['initialized_after_error'] = parallel_state.model_parallel_is_initialized()

    initialize_megatron_groups(DeviceMesh.from_sizes(dp_size=2), timeout=TIMEOUT, seed=SEED)
    result['dp2_view'] = megatron_view()
    torch.manual_seed(0)
    reference_model = build_model(tp=1)
    reference = forward_backward(reference_model)
    full_state = reference_model.state_dict()
    destroy_megatron_groups()

    initialize_megatron_groups(DeviceMesh.from_sizes(tp_size=2), timeout=TIMEOUT, seed=SEED)
    result['tp2_view'] = megatron_view()
    result['rng'] = rng_draws()
    model = build_model(tp=2)
    own_state = model.state_dict()
    model.load_state_dict({name: shard(name, full_state[name], rank, 2) if torch.is_tensor(value) else value
                           for name, value in own_state.items()}, strict=True)
    got = forward_backward(model)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    gathered = [torch.empty_like(got['logits']) for _ in range(2)]
    dist.all_gather(gathered, got['logits'], group=tp_group)
    for name, param in model.named_parameters():
        if not getattr(param, 'tensor_model_parallel', False):  # replicated: each rank holds a partial sum
            dist.all_reduce(got['grads'][name], group=tp_group)
    result.update(
        reference_logits=reference['logits'], logits=torch.cat(gathered, dim=-1), reference_loss=reference['loss'],
        loss=got['loss'], grads=got['grads'],
        reference_grads={name: shard(name, grad, rank, 2) for name, grad in reference['grads'].items()},
        applied_at_end=applied_patches())
    destroy_megatron_groups()
    torch.save(result, Path(out) / f'rank{rank}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
