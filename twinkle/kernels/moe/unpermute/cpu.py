"""MoE combine on CPU. Forward is one weighted ``embedding_bag`` (a fused gather, scale and sum
with no (tokens, k, H) temporary). Backward gathers each row's output gradient once, takes the
routing-weight gradient from it (a row dot product with the saved expert output), then scales it
in place into the expert-output gradient."""
import torch
import torch.nn.functional as F

from ..routing import slots_of_rows


class MoeUnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, row_map, topk_weights):
        ctx.save_for_backward(expert_out, row_map, topk_weights)
        return F.embedding_bag(row_map, expert_out, per_sample_weights=topk_weights, mode='sum')

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, row_map, topk_weights = ctx.saved_tensors
        slot_of_row = slots_of_rows(row_map)
        grad_rows = grad_out.index_select(0, slot_of_row // row_map.shape[1])
        grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = torch.linalg.vecdot(grad_rows, expert_out)[row_map]
        grad_rows.mul_(topk_weights.reshape(-1)[slot_of_row].unsqueeze(1))
        return grad_rows, None, grad_weights


def moe_unpermute(expert_out, row_map, topk_weights):
    return MoeUnpermuteFunction.apply(expert_out, row_map, topk_weights)
