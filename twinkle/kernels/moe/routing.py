"""What the dispatch and combine ops (moe_permute, moe_unpermute) share: the index bookkeeping, and
their forward and backward as torch ops, declared once for every backend.

A "slot" is a token's j-th choice, numbered t * k + j; a "row" is a row of the permuted tensor.
``row_map`` maps slots to rows; ``slot_of_row`` is its inverse.

A backend brings two row kernels (``cpu_rows.py``, ``triton_rows.py``) and gets the ops
``<namespace>::moe_permute_forward`` / ``_backward`` and ``moe_unpermute_forward`` / ``_backward``
with fake kernels and autograd: one opaque node each under torch.compile.

- ``copy_rows(src, slot_of_row, top_k, scale=None, dot_with=None) -> (rows, dots or None)``:
  ``rows[r] = scale[slot] * src[slot // k]`` for the slot row r came from, and optionally the dot
  product of the unscaled ``src[slot // k]`` with ``dot_with[r]``, as fp32 or ``src``'s dtype.
- ``sum_rows(src, row_map, weights=None) -> (tokens, H)``: ``out[t] = sum_j w[t, j] * src[row_map[t, j]]``.
"""
from types import ModuleType
from typing import Tuple

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


def define_permute(namespace: str, rows: ModuleType):
    """The dispatch of the backend whose row kernels are ``rows``: the op ``<namespace>::moe_permute_forward``,
    called as ``moe_permute(hidden, topk_ids, num_experts)``.
    Its backward sums each token's k gradient rows (no scatter-add into a zeroed buffer)."""

    @torch.library.custom_op(f'{namespace}::moe_permute_forward', mutates_args=())
    def forward(hidden: torch.Tensor, topk_ids: torch.Tensor,
                num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slot_of_row, row_map, tokens_per_expert = sort_by_expert(topk_ids, num_experts)
        permuted, _ = rows.copy_rows(hidden, slot_of_row, topk_ids.shape[1])
        return permuted, tokens_per_expert, row_map

    @forward.register_fake
    def _(hidden, topk_ids, num_experts):
        return (hidden.new_empty(topk_ids.numel(), hidden.shape[1]),
                hidden.new_empty(num_experts, dtype=torch.int64),
                topk_ids.new_empty(topk_ids.shape, dtype=torch.int64))

    @torch.library.custom_op(f'{namespace}::moe_permute_backward', mutates_args=())
    def backward_op(grad_permuted: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
        return rows.sum_rows(grad_permuted, row_map)

    @backward_op.register_fake
    def _(grad_permuted, row_map):
        return grad_permuted.new_empty(row_map.shape[0], grad_permuted.shape[1])

    def setup_context(ctx, inputs, output):
        _, tokens_per_expert, row_map = output
        ctx.mark_non_differentiable(tokens_per_expert, row_map)
        ctx.save_for_backward(row_map)

    def backward(ctx, grad_permuted, _grad_counts, _grad_row_map):
        row_map, = ctx.saved_tensors
        return backward_op(grad_permuted, row_map), None, None

    forward.register_autograd(backward, setup_context=setup_context)

    return forward


def define_unpermute(namespace: str, rows: ModuleType):
    """The combine of the backend whose row kernels are ``rows``: the op ``<namespace>::moe_unpermute_forward``,
    called as ``moe_unpermute(expert_out, row_map, topk_weights)``.
    Its backward copies each token's output gradient to its k rows scaled by the routing weight and
    takes the weight's gradient (the dot product with the saved expert output) in the same pass."""

    @torch.library.custom_op(f'{namespace}::moe_unpermute_forward', mutates_args=())
    def forward(expert_out: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return rows.sum_rows(expert_out, row_map, topk_weights)

    @forward.register_fake
    def _(expert_out, row_map, topk_weights):
        return expert_out.new_empty(row_map.shape[0], expert_out.shape[1])

    @torch.library.custom_op(f'{namespace}::moe_unpermute_backward', mutates_args=())
    def backward_op(grad_out: torch.Tensor, expert_out: torch.Tensor, row_map: torch.Tensor,
                    topk_weights: torch.Tensor, weights_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(grad of expert_out, grad of topk_weights: empty unless ``weights_grad``)."""
        grad_rows, dots = rows.copy_rows(grad_out, slots_of_rows(row_map), row_map.shape[1], scale=topk_weights,
                                         dot_with=expert_out if weights_grad else None)
        grad_weights = dots[row_map].to(topk_weights.dtype) if weights_grad else topk_weights.new_empty(0)
        return grad_rows, grad_weights

    @backward_op.register_fake
    def _(grad_out, expert_out, row_map, topk_weights, weights_grad):
        return (expert_out.new_empty(expert_out.shape),
                topk_weights.new_empty(topk_weights.shape if weights_grad else (0,)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_out):
        expert_out, row_map, topk_weights = ctx.saved_tensors
        weights_grad = ctx.needs_input_grad[2]
        grad_rows, grad_weights = backward_op(grad_out, expert_out, row_map, topk_weights, weights_grad)
        return grad_rows, None, grad_weights if weights_grad else None

    forward.register_autograd(backward, setup_context=setup_context)

    return forward
