"""Index bookkeeping shared by the fast dispatch and combine backends (moe_permute, moe_unpermute).

A "slot" is a token's j-th choice, numbered t * k + j; a "row" is a row of the permuted tensor.
``row_map`` maps slots to rows; ``slot_of_row`` is its inverse.
"""
import torch


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """(slot_of_row, row_map, tokens_per_expert): a stable sort of the slots by expert id."""
    flat_ids = topk_ids.reshape(-1)
    slot_of_row = torch.sort(flat_ids, stable=True).indices
    row_map = _inverse(slot_of_row)
    return slot_of_row, row_map.view(topk_ids.shape), torch.bincount(flat_ids, minlength=num_experts)


def slots_of_rows(row_map: torch.Tensor) -> torch.Tensor:
    """For each permuted row, the slot it was copied from."""
    return _inverse(row_map.reshape(-1))


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device)
    return inverse
