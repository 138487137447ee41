"""A tiny megatron-core GPTModel on 2 gloo ranks through the CPU shim, and its tp=1 twin.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.model.megatron.gpt_job OUT_DIR

Each rank first builds the model at tp=1 (Megatron groups for dp=2: the forward and backward touch
no other rank, so this is the one-process computation), records its logits, loss and gradients,
and destroys the groups. Then at tp=2 with sequence parallelism it loads the same weights, sharded
by hand, and records the gathered logits and its gradient shards; then at pp=2 it runs Megatron's
pipeline schedule over two micro-batches. ``OUT_DIR/rank<r>.pt`` holds all three, with the shim's
record, the RNG tracker's draws and Megatron's view of the groups.
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


def build_model(tp: int = 1, pp: int = 1, pp_rank: int = 0):
    """The tiny GPTModel MegatronModel would build (the bridge: megatron-core's local layer spec with
    norms that run sequence-parallel, which its own WrappedTorchNorm refuses)."""
    from transformers import Qwen3Config

    from twinkle.model.megatron import bridge
    hf_config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4 * SEQ,
                            tie_word_embeddings=False)
    config = bridge.transformer_config(hf_config, tp=tp, pp=pp, sequence_parallel=tp > 1)
    return bridge.gpt_model(hf_config, config, pp_rank=pp_rank)


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


def tensor_parallel_run(full_state: dict, reference: dict, rank: int) -> dict:
    """tp=2 with sequence parallelism: gathered logits, loss, and this rank's gradient shards."""
    from megatron.core import parallel_state
    model = build_model(tp=2)
    model.load_state_dict({name: shard(name, full_state[name], rank, 2) if torch.is_tensor(value) else value
                           for name, value in model.state_dict().items()}, strict=True)
    got = forward_backward(model)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    gathered = [torch.empty_like(got['logits']) for _ in range(2)]
    dist.all_gather(gathered, got['logits'], group=tp_group)
    for name, param in model.named_parameters():
        if not getattr(param, 'tensor_model_parallel', False):  # replicated: each rank holds a partial sum
            dist.all_reduce(got['grads'][name], group=tp_group)
    return {'logits': torch.cat(gathered, dim=-1), 'loss': got['loss'], 'grads': got['grads'],
            'reference_grads': {name: shard(name, grad, rank, 2) for name, grad in reference['grads'].items()}}


def pipeline_run(full_state: dict, reference: dict, rank: int) -> dict:
    """pp=2 through Megatron's 1F1B schedule, one row per micro-batch: the last stage's losses and
    this stage's gradients, next to the tp=1 gradients of the same (globally numbered) layers."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    model = build_model(pp=2, pp_rank=rank)
    first_layer = rank * (model.config.num_layers // 2)

    def global_name(name: str) -> str:
        if not name.startswith('decoder.layers.'):
            return name
        index, rest = name[len('decoder.layers.'):].split('.', 1)
        return f'decoder.layers.{first_layer + int(index)}.{rest}'

    model.load_state_dict({name: full_state[global_name(name)] if torch.is_tensor(value) else value
                           for name, value in model.state_dict().items()}, strict=True)

    def forward_step(rows, stage):
        input_ids = next(rows)
        per_token = stage(input_ids, torch.arange(SEQ).expand(1, SEQ), None, labels=torch.roll(input_ids, -1, dims=1))
        return per_token, lambda losses: (losses.mean(), {'loss': losses.mean().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(tokens().split(1)), model=[model], num_microbatches=BATCH,
        seq_length=SEQ, micro_batch_size=1, forward_only=False)
    return {'microbatch_losses': [record['loss'] for record in losses],
            'grads': {name: param.grad.detach().clone() for name, param in model.named_parameters()},
            'reference_grads': {name: reference['grads'][global_name(name)] for name, _ in model.named_parameters()}}


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
    reference_model = build_model()
    reference = forward_backward(reference_model)
    full_state = reference_model.state_dict()
    result.update(reference_logits=reference['logits'], reference_loss=reference['loss'])
    destroy_megatron_groups()

    initialize_megatron_groups(DeviceMesh.from_sizes(tp_size=2), timeout=TIMEOUT, seed=SEED)
    result['tp2_view'] = megatron_view()
    result['rng'] = rng_draws()
    result['tp2'] = tensor_parallel_run(full_state, reference, rank)
    destroy_megatron_groups()

    initialize_megatron_groups(DeviceMesh.from_sizes(pp_size=2), timeout=TIMEOUT, seed=SEED)
    result['pp2'] = pipeline_run(full_state, reference, rank)
    destroy_megatron_groups()
    result['applied_at_end'] = applied_patches()
    torch.save(result, Path(out) / f'rank{rank}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
