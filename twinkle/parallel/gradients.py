"""Gradient normalisation and clipping that give the same numbers on one rank or many.

After ``parallelize`` the data-parallel reduction SUMS gradients over ranks (no averaging), so a
loss that is a sum over this rank's tokens yields the gradient of the sum over all tokens. Dividing
by the global token count (``all_reduce_sum`` of the local counts over data ranks and micro-batches)
then gives exactly the single-process mean-token loss gradient, however unevenly tokens fall.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Union

import torch
import torch.distributed as dist

from .collectives import collective
from .expert_parallel import expert_parallel_group

Parameters = Union[torch.Tensor, Iterable[torch.Tensor]]


def scale_gradients_(parameters: Parameters, divisor: Union[float, torch.Tensor]) -> None:
    """Divide every existing ``.grad`` in place by ``divisor`` (e.g. the global token count)."""
    divisor = float(divisor)
    if not divisor > 0:
        raise ValueError(f'divisor must be > 0 (e.g. a token count), got {divisor}')
    for parameter in _as_list(parameters):
        if parameter.grad is not None:
            parameter.grad.div_(divisor)


def clip_grad_norm_(parameters: Parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip gradients to ``max_norm`` by their total norm over ALL shards; returns that norm.

    With FSDP each rank holds a shard of each gradient (a DTensor); the norm of the local pieces
    alone would differ per rank and clip each shard differently. With expert parallelism the
    experts' gradients live on another mesh (the EP-complement) and each EP rank holds other
    experts: their norm is finished over the shards, then summed over the EP group.
    """
    if not max_norm > 0:
        raise ValueError(f'max_norm must be > 0, got {max_norm}')
    norm_type = float(norm_type)
    parameters = _as_list(parameters)
    by_group: Dict[object, list] = {}  # EP group (None: parameters every rank has) -> parameters
    for parameter in parameters:
        if parameter.grad is not None:
            by_group.setdefault(expert_parallel_group(parameter), []).append(parameter)
    norms = [_norm_over_ranks([p.grad for p in group_parameters], norm_type, group)
             for group, group_parameters in by_group.items()]
    total_norm = (torch.nn.utils.get_total_norm(norms, norm_type, error_if_nonfinite) if norms
                  else torch.tensor(0.0))
    for group_parameters in by_group.values():  # one call per mesh: DTensor ops refuse mixed meshes
        torch.nn.utils.clip_grads_with_norm_(group_parameters, max_norm, total_norm)
    return total_norm


def _norm_over_ranks(grads: list, norm_type: float, ep_group) -> torch.Tensor:
    """The norm of ``grads`` over their FSDP shards and, for expert-local ones, over ``ep_group``."""
    norm = torch.nn.utils.get_total_norm(grads, norm_type)
    if hasattr(norm, 'full_tensor'):  # a DTensor: finish the reduction over the shards
        norm = norm.full_tensor()
    if ep_group is None:
        return norm
    with collective('clip_grad_norm_experts'):
        if norm_type == math.inf:
            dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=ep_group)
            return norm
        powered = norm.double() ** norm_type
        dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=ep_group)
    return (powered ** (1.0 / norm_type)).to(norm.dtype)


def _as_list(parameters: Parameters) -> list:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
