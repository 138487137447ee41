"""Index bookkeeping shared by the dispatch and combine ops (moe_permute, moe_unpermute).

A "slot" is a token's j-th choice, numbered t * k + j; a "row" is a row of the permuted tensor.
``row_map`` maps slots to rows; ``slot_of_row`` is its inverse.
"""
import torch

# Dispatch and combine come as a pair: the same backends, the same preferences (see the registry).
ROUTING_BACKENDS = ['reference', 'cpu', 'triton', 'npu']


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """(slot_of_row, row_map, tokens_per_expert): a stable sort of the slots by expert id."""
    flat_ids = topk_ids.reshape(-1)
    slot_of_row = torch.sort(flat_ids, stable=True).indices
    row_map = _inverse(slot_of_row)
    return slot_of_row, row_map.view(topk_ids.shape), count_per_expert(flat_ids, num_experts)


def count_per_expert(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(num_experts,) int64 counts. Not ``torch.bincount``: on a GPU it reads the largest id to the
    host to size its output (a sync per layer); a scatter-add into ``num_experts`` slots does not."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids.long(), torch.ones_like(flat_ids, dtype=torch.int64))


def slots_of_rows(row_map: torch.Tensor) -> torch.Tensor:
    """For each permuted row, the slot it was copied from."""
    return _inverse(row_map.reshape(-1))


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(permutation).scatter_(0, permutation,
                                                  torch.arange(permutation.numel(), device=permutation.device))
