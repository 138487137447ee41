"""An embedded tiny model as megatron-core's GPTModel through twinkle's bridge, on CPU gloo ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=N \\
        -m tests.model.megatron.bridge_logits_job OUT_DIR MODEL TP EP PP

Each rank builds its GPTModel chunk (``transformer_config`` / ``gpt_model``, sequence parallelism
on when TP > 1), loads ``hf_to_mcore`` of the HF safetensors with ``strict=True`` (so the keys and
shapes are the model's own), and runs one forward: pipeline stages hand the hidden states on by
hand, the last stage gathers the vocab-parallel logits over tp. Rank 0 also gathers every rank's
state dict and turns it back with ``mcore_to_hf``. ``OUT_DIR/rank<r>.pt`` holds, on the last
stage, the logits and the Hugging Face model's logits for the same tokens; on rank 0 the round
trip and the file's tensors.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import twinkle
from twinkle import DeviceMesh, assets
from twinkle.model.megatron import destroy_megatron_groups, initialize_megatron_groups
from twinkle.model.megatron.bridge import gpt_model, transformer_config
from twinkle.model.megatron.bridge_keys import hf_to_mcore, load_hf_state_dict, mcore_to_hf

TIMEOUT = datetime.timedelta(seconds=120)
BATCH, SEQ, SEED = 2, 16, 1234


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def causal_mask(length: int) -> torch.Tensor:
    """megatron-core's attention mask: bool [1, 1, s, s], True where a query may not look."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]


def forward(model, input_ids: torch.Tensor, pp_size: int):
    """One forward through this rank's stage; hidden states [s, b, h] travel to the next stage by hand."""
    from megatron.core import parallel_state as ps
    if not ps.is_pipeline_first_stage():
        shape = torch.empty(3, dtype=torch.long)  # [s (/ tp with sequence parallelism), b, h] first
        dist.recv(shape, src=ps.get_pipeline_model_parallel_prev_rank())
        hidden = torch.empty(*shape.tolist())
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    output = model(input_ids, position_ids, causal_mask(SEQ))
    if pp_size > 1 and not ps.is_pipeline_last_stage():
        dist.send(torch.tensor(output.shape), dst=ps.get_pipeline_model_parallel_next_rank())
        dist.send(output.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    group = ps.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(output) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, output.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def hf_logits(path: str, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


def round_trip(state: dict, coordinates: dict, hf_config, sizes: dict):
    """Rank 0: every rank's state dict, back to HF tensors (the union over pipeline stages)."""
    shards = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((coordinates, state), shards, dst=0)
    if dist.get_rank() != 0:
        return None
    hf = {}
    for pp_rank in range(sizes['pp_size']):
        stage = {(c['tp_rank'], c['ep_rank']): s for c, s in shards if c['pp_rank'] == pp_rank}
        hf.update(mcore_to_hf(stage, hf_config, tp_size=sizes['tp_size'], ep_size=sizes['ep_size'],
                              pp_rank=pp_rank, pp_size=sizes['pp_size'], expert_layout='fused'))
    return hf


def main(out: str, name: str, tp: str, ep: str, pp: str) -> None:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig
    sizes = dict(tp_size=int(tp), ep_size=int(ep), pp_size=int(pp))
    mesh = DeviceMesh.from_sizes(tp_size=sizes['tp_size'], ep_size=sizes['ep_size'], pp_size=sizes['pp_size'])
    twinkle.initialize(global_device_mesh=mesh, seed=0, timeout=TIMEOUT)
    initialize_megatron_groups(mesh, timeout=TIMEOUT, seed=SEED)
    path = assets.tiny_model_path(name)
    hf_config = AutoConfig.from_pretrained(path)
    coordinates = dict(tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                       ep_rank=ps.get_expert_model_parallel_rank())
    config = transformer_config(hf_config, tp=sizes['tp_size'], pp=sizes['pp_size'], ep=sizes['ep_size'],
                                sequence_parallel=sizes['tp_size'] > 1)
    model = gpt_model(hf_config, config)  # this process's pipeline stage
    hf_state = load_hf_state_dict(path)
    model.load_state_dict(hf_to_mcore(hf_state, hf_config, **coordinates, **sizes), strict=True)
    model.eval()
    input_ids = tokens(hf_config.vocab_size)
    result = dict(coordinates, parameters=sum(p.numel() for p in model.parameters()))
    with torch.no_grad():
        logits = forward(model, input_ids, sizes['pp_size'])
    if logits is not None:
        result.update(logits=logits[..., :hf_config.vocab_size], reference_logits=hf_logits(path, input_ids))
    state = {key: value for key, value in model.state_dict().items() if torch.is_tensor(value)}
    restored = round_trip(state, coordinates, hf_config, sizes)
    if restored is not None:
        result.update(restored=restored, original={key: hf_state[key] for key in hf_state})
    destroy_megatron_groups()
    torch.save(result, Path(out) / f'rank{dist.get_rank()}.pt')


if __name__ == '__main__':
    from tests.torchrun_job import run
    run(main, *sys.argv[1:])
