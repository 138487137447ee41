"""MoE dispatch in plain PyTorch: the oracle of the tests and the fallback on every device.
Registered as the op ``twinkle_ref::moe_permute`` (autograd by recompute, see ``kernels/library.py``)."""
from typing import Tuple

import torch

from ...library import reference_op


def _moe_permute(hidden: torch.Tensor, topk_ids: torch.Tensor,
                 num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    slot_of_row = torch.argsort(flat_ids, stable=True)  # row r holds choice slot t * k + j
    row_map = torch.argsort(slot_of_row).view(topk_ids.shape)
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device).scatter_add_(
        0, flat_ids.long(), torch.ones_like(flat_ids, dtype=torch.int64))
    return hidden[slot_of_row // top_k], tokens_per_expert, row_map


moe_permute = reference_op('moe_permute', _moe_permute)
