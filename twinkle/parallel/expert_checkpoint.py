"""Expert-parallel parameters in checkpoints: this rank's slice <-> the full tensors one process holds.

A checkpoint written under EP must load on one process (and back under any EP layout), so every
expert-local tensor is gathered to all experts on save and cut to a rank's experts on load.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .collectives import collective
from .expert_parallel import AllToAllTokenDispatcher, expert_units

# Where the experts sit in each expert-local tensor. Fused expert weights (E, out, in) stack them on
# dim 0. peft's LoRA on a 3-D parameter keeps lora_A.weight (E * r, in), expert-major rows, and
# lora_B.weight (out, r * E) whose columns are rank-major (column = i * E + e): an EP rank's experts
# are a strided set of columns there, not a block, so lora_B is viewed as (out, r, E).

def _expert_axis_view(name: str, tensor: torch.Tensor, experts: int) -> Tuple[torch.Tensor, int]:
    """``tensor`` viewed so that one dim indexes the ``experts`` experts; returns (view, that dim)."""
    if '.lora_B.' in name:
        return tensor.reshape(tensor.shape[0], -1, experts), 2
    if '.lora_A.' in name:
        return tensor.reshape(experts, -1, tensor.shape[-1]), 0
    if name.endswith(('gate_up_proj', 'down_proj')) and tensor.dim() == 3:
        return tensor, 0
    raise ValueError(f'{name}: expert-local tensor of unknown layout (shape {tuple(tensor.shape)}); '
                     f'expert parallelism knows fused expert weights and peft LoRA A/B on them')


def _expert_local_parameters(model: nn.Module) -> Dict[str, Tuple[nn.Parameter, AllToAllTokenDispatcher]]:
    """Name (as in ``model.state_dict()``) of every expert-local parameter -> (it, the dispatcher that
    says which experts this rank holds)."""
    return {name: (parameter, base) for prefix, module, base in expert_units(model)
            for name, parameter in module.named_parameters(prefix=prefix)}


def full_expert_state_dict(model: nn.Module, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
    """Every expert-local parameter with all experts, as one process would hold it, on CPU. The
    first rank of each EP group gets the tensors, the others an empty dict; collective (FSDP
    shards are gathered first, then the EP slices)."""
    full = {}
    for name, (parameter, base) in _expert_local_parameters(model).items():
        if trainable_only and not parameter.requires_grad:
            continue
        local = parameter.detach()
        local = (local.full_tensor() if hasattr(local, 'full_tensor') else local).cpu()
        view, dim = _expert_axis_view(name, local, base.local_experts)
        group = base.ep_group
        is_first = dist.get_rank(group) == 0
        pieces = [torch.empty_like(view) for _ in range(dist.get_world_size(group))] if is_first else None
        with collective('ep_gather_experts'):
            dist.gather(view.contiguous(), pieces, group=group, group_dst=0)
        if is_first:
            full[name] = torch.cat(pieces, dim=dim).reshape(_scaled_shape(local.shape, name, base, to_full=True))
    return full


def expert_local_keys(model: nn.Module) -> Dict[str, str]:
    """State-dict key of every expert-local parameter -> a key naming this rank's slice of it."""
    return {name: f'{name}@ep{dist.get_rank(base.ep_group)}of{base.num_experts // base.local_experts}'
            for name, (_, base) in _expert_local_parameters(model).items()}


def shard_expert_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                            adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The inverse: full tensors (as saved by one process) -> this rank's expert slices. Keys are
    ``model.state_dict()`` names, or with ``adapter_name`` peft's saved adapter names (which leave
    the adapter name out)."""
    owners = {}
    for name, (_, base) in _expert_local_parameters(model).items():
        owners[name.replace(f'.{adapter_name}.', '.') if adapter_name else name] = base
    sharded = dict(state_dict)
    for key, full in state_dict.items():
        base = owners.get(key)
        if base is None:
            continue
        view, dim = _expert_axis_view(key, full, base.num_experts)
        local = view.narrow(dim, base.first_expert, base.local_experts)
        sharded[key] = local.reshape(_scaled_shape(full.shape, key, base, to_full=False)).clone()
    return sharded


def _scaled_shape(shape: torch.Size, key: str, base: AllToAllTokenDispatcher, to_full: bool) -> Tuple[int, ...]:
    """The shape of the full (``to_full``) or local counterpart of an expert tensor of ``shape``."""
    ep_size = base.num_experts // base.local_experts
    axis = 1 if '.lora_B.' in key else 0
    shape = list(shape)
    shape[axis] = shape[axis] * ep_size if to_full else shape[axis] // ep_size
    return tuple(shape)


__all__ = ['expert_local_keys', 'full_expert_state_dict', 'shard_expert_state_dict']
