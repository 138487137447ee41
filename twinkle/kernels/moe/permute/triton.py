"""MoE dispatch in Triton: the sort stays with torch, the row copies and the backward's sum of
each token's k gradient rows are the kernels of triton_rows.py."""
import torch

from ..routing import sort_by_expert
from ..triton_rows import copy_rows, sum_rows


class TritonMoePermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, topk_ids, num_experts):
        slot_of_row, row_map, tokens_per_expert = sort_by_expert(topk_ids, num_experts)
        permuted, _ = copy_rows(hidden, slot_of_row, topk_ids.shape[1])
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(tokens_per_expert, row_map)
        return permuted, tokens_per_expert, row_map

    @staticmethod
    def backward(ctx, grad_permuted, _grad_counts, _grad_row_map):
        row_map, = ctx.saved_tensors
        return sum_rows(grad_permuted, row_map), None, None


def moe_permute(hidden, topk_ids, num_experts):
    return TritonMoePermuteFunction.apply(hidden, topk_ids, num_experts)
