"""Gradient normalisation and clipping that give the same numbers on one rank or many.

After ``parallelize`` the data-parallel reduction SUMS gradients over ranks (no averaging), so a
loss that is a sum over this rank's tokens yields the gradient of the sum over all tokens. Dividing
by the global token count (``all_reduce_sum`` of the local counts over data ranks and micro-batches)
then gives exactly the single-process mean-token loss gradient, however unevenly tokens fall.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

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
    alone would differ per rank and clip each shard differently.
    """
    if not max_norm > 0:
        raise ValueError(f'max_norm must be > 0, got {max_norm}')
    parameters = _as_list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    if hasattr(total_norm, 'full_tensor'):  # a DTensor: finish the reduction over the shards
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


def _as_list(parameters: Parameters) -> list:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
