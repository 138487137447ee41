"""MoE combine in Triton: forward is the weighted row sum of triton_rows.py; backward copies each
token's output gradient to its k rows scaled by the routing weight, taking the weight's gradient
(the dot product with the saved expert output) in the same pass."""
import torch

from ..routing import slots_of_rows
from ..triton_rows import copy_rows, sum_rows


class TritonMoeUnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, row_map, topk_weights):
        ctx.save_for_backward(expert_out, row_map, topk_weights)
        return sum_rows(expert_out, row_map, topk_weights)

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, row_map, topk_weights = ctx.saved_tensors
        want_weights = ctx.needs_input_grad[2]
        grad_rows, grad_weight_rows = copy_rows(grad_out, slots_of_rows(row_map), row_map.shape[1],
                                                scale=topk_weights, dot_with=expert_out if want_weights else None)
        grad_weights = grad_weight_rows[row_map].to(topk_weights.dtype) if want_weights else None
        return grad_rows, None, grad_weights


def moe_unpermute(expert_out, row_map, topk_weights):
    return TritonMoeUnpermuteFunction.apply(expert_out, row_map, topk_weights)
