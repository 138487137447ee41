"""MegatronModel checkpoints: what plain transformers / peft load, plus each rank's resume state.

- full model: rank 0 gathers every rank's slice (tp, ep, pipeline stages) and writes one Hugging
  Face ``model.safetensors`` + config;
- LoRA adapter: rank 0 merges the tp slices of each projection and writes a peft adapter
  (``adapter_model.safetensors`` with HF key names, ``adapter_config.json``), at the place peft and
  ``TransformersModel`` use (``checkpoint.adapter_dir``);
- ``save_optimizer=True``: ``sharded/rank<r>.pt`` per rank -- its trainable slice, optimizer,
  schedule and RNG (``TrainState.trainer_state``) -- resumed on the same layout only (the file
  records it). Megatron's ``dist_checkpointing`` would reshard, but needs its distributed optimizer,
  which does not run on CPU.
All ranks write into one staging directory that replaces ``path`` at once
(``twinkle.parallel.checkpoint.checkpoint_directory``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping

import torch
import torch.distributed as dist
from torch import nn

from twinkle.model.transformers.checkpoint import adapter_dir
from twinkle.parallel.checkpoint import checkpoint_directory, recover_checkpoint
from twinkle.utils.logger import get_logger

from . import bridge_keys
from .lora import LoraParallelLinear, merge_tp

logger = get_logger(__name__)

SHARDED = 'sharded'
PEFT_PREFIX = 'base_model.model.'


def base_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's own weights under Megatron's names (LoRA wrappers and adapters left out)."""
    return {key.replace('.base_layer.', '.'): value for key, value in model.state_dict().items()
            if '.lora_' not in key and not key.endswith('_extra_state')}


def load_base_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Megatron-named weights into ``model``, wrapped or not; every base weight must be covered."""
    wrapped = {key.replace('.base_layer.', '.'): key for key in model.state_dict()}
    missing, unexpected = model.load_state_dict({wrapped.get(key, key): value for key, value in state.items()},
                                                strict=False)
    missing = [key for key in missing if '.lora_' not in key and not key.endswith('_extra_state')]
    if missing or unexpected:
        raise RuntimeError(f'the converted weights do not fit the Megatron model: missing {missing[:5]}, '
                           f'unexpected {unexpected[:5]}')


def save(owner, path: str, adapter: str, trainer_state=None) -> None:
    """Collective: ``owner`` is the MegatronModel; ``adapter`` '' for the full model."""
    from megatron.core import parallel_state as ps
    where = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_expert_model_parallel_rank(), ps.get_data_parallel_rank())
    mine = _adapter_state(owner.lora_layers, adapter) if adapter else {
        key: value.detach().cpu() for key, value in base_state(owner.model).items()}
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (where, mine))
    with checkpoint_directory(path) as staging:
        if dist.get_rank() == 0:
            if adapter:
                _write_adapter(owner, adapter_dir(staging, adapter), adapter, gathered)
            else:
                _write_full(owner, staging, gathered)
        if trainer_state is not None:
            os.makedirs(os.path.join(staging, SHARDED), exist_ok=True)
            torch.save({'layout': owner.layout, 'trainable': _trainable(owner, adapter), **trainer_state},
                       os.path.join(staging, SHARDED, f'rank{dist.get_rank()}.pt'))
    logger.info('saved %s to %s%s', f'adapter {adapter!r}' if adapter else 'the full model', path,
                ' with the resume state of every rank' if trainer_state is not None else '')


def load_resume_state(owner, path: str, adapter: str) -> dict:
    """This rank's trainable weights from ``sharded/rank<r>.pt``; returns the rest (trainer state)."""
    recover_checkpoint(path)
    file = os.path.join(path, SHARDED, f'rank{dist.get_rank()}.pt')
    if not os.path.exists(file):
        raise ValueError(f'{path} holds no resume state for rank {dist.get_rank()} (saved without '
                         f'save_optimizer=True, or on fewer ranks)')
    state = torch.load(file, weights_only=False)
    if state['layout'] != owner.layout:
        raise ValueError(f'{path} was saved with the parallel layout {state["layout"]}, this model has '
                         f'{owner.layout}: resume on the same tp/pp/ep/dp sizes (or load its weights without '
                         f'load_optimizer)')
    parameters = _named_trainable(owner, adapter)
    if set(state['trainable']) != set(parameters):
        raise ValueError(f'{path} holds other trainable weights than {adapter or "the full model"!r}: '
                         f'{sorted(set(state["trainable"]) ^ set(parameters))[:5]}')
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state['trainable'][name])
    return state


def load_adapter(owner, path: str, adapter: str) -> None:
    """A peft adapter directory (ours or peft's, same targets) into this rank's LoRA slices."""
    from safetensors.torch import load_file
    file = os.path.join(adapter_dir(path, adapter), 'adapter_model.safetensors')
    if not os.path.exists(file):
        raise FileNotFoundError(f'no peft adapter for {adapter!r} at {file}')
    flat = load_file(file)
    weights = {}
    for layer in owner.lora_layers:
        for name in layer.local_state(adapter):
            keys = [f'{PEFT_PREFIX}{name}.lora_{factor}.weight' for factor in 'AB']
            absent = [key for key in keys if key not in flat]
            if absent:
                raise ValueError(f'{file} lacks {absent[0]} of adapter {adapter!r}')
            weights[name] = tuple(flat[key] for key in keys)
        layer.load_full(adapter, weights)


def _adapter_state(layers: List[LoraParallelLinear], adapter: str) -> Dict[str, tuple]:
    return {name: (layer.kind, *factors) for layer in layers for name, factors in layer.local_state(adapter).items()}


def _write_adapter(owner, directory: str, adapter: str, gathered) -> None:
    from safetensors.torch import save_file
    slices: Dict[str, Dict[int, tuple]] = {}
    for (_, tp_rank, _, dp_rank), state in gathered:
        if dp_rank == 0:  # the other data ranks (ep ranks included) hold copies
            for name, value in state.items():
                slices.setdefault(name, {})[tp_rank] = value
    tensors = {}
    for name, by_rank in slices.items():
        kind = by_rank[0][0]
        a, b = merge_tp(kind, [by_rank[rank][1:] for rank in sorted(by_rank)])
        tensors[f'{PEFT_PREFIX}{name}.lora_A.weight'] = a.contiguous()
        tensors[f'{PEFT_PREFIX}{name}.lora_B.weight'] = b.contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    config = owner.lora_configs[adapter]
    targets = sorted(owner.lora_settings[adapter].targets)
    dataclasses.replace(config, target_modules=targets, base_model_name_or_path=owner.model_dir,
                        task_type=config.task_type or 'CAUSAL_LM').save_pretrained(directory)


def _write_full(owner, directory: str, gathered) -> None:
    from safetensors.torch import save_file
    hf_state = {}
    sizes = owner.sizes
    for stage in range(sizes['pp']):
        shards = {(tp_rank, ep_rank): state for (pp_rank, tp_rank, ep_rank, _), state in gathered
                  if pp_rank == stage}  # data ranks with the same (tp, ep) slice hold copies
        hf_state.update(bridge_keys.mcore_to_hf(shards, owner.hf_config, tp_size=sizes['tp'], ep_size=sizes['ep'],
                                                pp_rank=stage, pp_size=sizes['pp']))
    save_file(hf_state, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
    owner.hf_config.save_pretrained(directory)


def _named_trainable(owner, adapter: str) -> Dict[str, nn.Parameter]:
    wanted = {id(parameter) for parameter in owner._state(adapter).parameters}
    return {name: parameter for name, parameter in owner.model.named_parameters() if id(parameter) in wanted}


def _trainable(owner, adapter: str) -> Dict[str, torch.Tensor]:
    return {name: parameter.detach().cpu() for name, parameter in _named_trainable(owner, adapter).items()}
