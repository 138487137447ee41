"""MoE dispatch in one process: each token copied once per chosen expert, grouped by expert.

    permuted, tokens_per_expert, row_map = moe_permute(hidden, topk_ids, num_experts)

Expert e owns the ``tokens_per_expert[e]`` rows of ``permuted`` after those of experts < e; inside
a group rows keep token order. ``row_map[t, j]`` is the row holding token t's j-th choice, which
is all ``moe_unpermute`` needs to combine the expert outputs back in token order.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import registry
from ...checks import (check_values, require_ids_in_range, require_integer, require_same_device, require_size,
                       require_tensor)
from ..routing import ROUTING_BACKENDS

registry.register('moe_permute', ROUTING_BACKENDS, package=__name__)


def moe_permute(hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
                backend: Optional[str] = None):
    """``hidden`` (tokens, H) and the experts each token chose, ``topk_ids`` (tokens, k), ->
    ``permuted`` (tokens * k, H), ``tokens_per_expert`` (num_experts,) int64, ``row_map`` (tokens, k)
    int64. Differentiable in ``hidden``: its gradient sums the gradients of a token's k copies."""
    require_tensor('hidden', hidden, floating=True, dims=(2,))
    require_tensor('topk_ids', topk_ids, dims=(2,))
    require_integer('topk_ids', topk_ids)
    require_size('topk_ids', topk_ids.shape[0], hidden.shape[0], 'rows equal to the tokens of hidden,')
    require_same_device('hidden', hidden, topk_ids=topk_ids)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f'num_experts must be a positive int, got {num_experts!r}')
    top_k = topk_ids.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f'topk_ids: top-k (its dim 1) must be in [1, num_experts={num_experts}], got {top_k}')
    if check_values():  # the router computes topk_ids: only a debug run reads them (a host sync)
        require_ids_in_range('topk_ids (expert ids)', topk_ids, num_experts)
    return registry.resolve('moe_permute', backend, hidden.device)(hidden, topk_ids, num_experts)


__all__ = ['moe_permute']
