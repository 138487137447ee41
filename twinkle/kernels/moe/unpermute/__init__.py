"""MoE combine in one process: each token's k expert outputs, weighted, summed back in token order.

    out = moe_unpermute(expert_out, row_map, topk_weights)   # out[t] = sum_j w[t, j] * expert_out[row_map[t, j]]

``row_map`` is the one ``moe_permute`` returned. Differentiable in ``expert_out`` and ``topk_weights``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import registry
from ...checks import (check_values, require_ids_in_range, require_integer, require_same_device, require_size,
                       require_tensor)
from ..routing import ROUTING_BACKENDS

registry.register('moe_unpermute', ROUTING_BACKENDS, package=__name__)


def moe_unpermute(expert_out: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``expert_out`` (tokens * k, H), ``row_map`` (tokens, k), ``topk_weights`` (tokens, k) ->
    (tokens, H) in ``expert_out``'s dtype; the weights are applied in that dtype too."""
    require_tensor('expert_out', expert_out, floating=True, dims=(2,))
    require_tensor('row_map', row_map, dims=(2,))
    require_integer('row_map', row_map)
    require_tensor('topk_weights', topk_weights, floating=True, dims=(2,))
    if topk_weights.shape != row_map.shape:
        raise ValueError(f'topk_weights must have the shape of row_map {tuple(row_map.shape)}, '
                         f'got {tuple(topk_weights.shape)}')
    require_size('expert_out', expert_out.shape[0], row_map.numel(), 'rows equal to the elements of row_map,')
    require_same_device('expert_out', expert_out, row_map=row_map, topk_weights=topk_weights)
    if check_values():  # a value check is a host sync: once per batch upstream, or here when debugging
        require_ids_in_range('row_map', row_map, expert_out.shape[0])
    return registry.resolve('moe_unpermute', backend, expert_out.device)(
        expert_out, row_map.long(), topk_weights.to(expert_out.dtype))


__all__ = ['moe_unpermute']
