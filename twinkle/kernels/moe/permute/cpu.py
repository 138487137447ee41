"""MoE dispatch on CPU: a stable sort of the choices by expert, one ``index_select`` for the copies, and a
backward that sums each token's k gradient rows with ``embedding_bag`` (one pass, no scatter-add
into a zeroed buffer as autograd's index backward does)."""
import torch
import torch.nn.functional as F

from ..routing import sort_by_expert


class MoePermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, topk_ids, num_experts):
        slot_of_row, row_map, tokens_per_expert = sort_by_expert(topk_ids, num_experts)
        permuted = hidden.index_select(0, slot_of_row // topk_ids.shape[1])
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(tokens_per_expert, row_map)
        return permuted, tokens_per_expert, row_map

    @staticmethod
    def backward(ctx, grad_permuted, _grad_counts, _grad_row_map):
        row_map, = ctx.saved_tensors
        return F.embedding_bag(row_map, grad_permuted.contiguous(), mode='sum'), None, None


def moe_permute(hidden, topk_ids, num_experts):
    return MoePermuteFunction.apply(hidden, topk_ids, num_experts)
