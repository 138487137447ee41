"""Token dispatchers: how an MoE layer's tokens reach its experts and come back.

    dispatched = dispatcher.dispatch(hidden, top_k_index, num_local_experts)
    expert_out = experts_compute(dispatched.rows, dispatched.tokens_per_expert)   # rows grouped by expert
    out = dispatcher.combine(expert_out, dispatched, top_k_weights)

The experts module holds one (``TwinkleMoeExperts.token_dispatcher``) and does not know where its
rows come from: ``LocalTokenDispatcher`` (the default) permutes within this process;
expert parallelism installs an all-to-all one over the EP group
(``twinkle.parallel.expert_parallel.AllToAllTokenDispatcher``) that sends each copy of a token to
the rank owning its expert. The shape is torchtitan's: dispatch = permute (+ exchange), combine =
the reverse (+ the weighted sum in token order).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .permute import moe_permute
from .unpermute import moe_unpermute


class Dispatched(NamedTuple):
    """What the experts of this process compute on, and what ``combine`` needs to undo it."""

    rows: torch.Tensor               # (rows, H), grouped by local expert (expert e after experts < e)
    tokens_per_expert: torch.Tensor  # (local experts,) int64
    handle: Any                      # the dispatcher's own bookkeeping (row maps, split sizes)


class TokenDispatcher:
    """The interface; see the module docstring. ``top_k_index`` holds the router's expert ids (over
    all experts); ``num_local_experts`` is how many experts the calling module holds."""

    def dispatch(self, hidden: torch.Tensor, top_k_index: torch.Tensor, num_local_experts: int) -> Dispatched:
        raise NotImplementedError

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched, top_k_weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LocalTokenDispatcher(TokenDispatcher):
    """Every expert is in this process: permute -> (experts) -> weighted unpermute. Stateless, so
    one instance serves every layer; no host sync (the ops read no tensor values)."""

    def dispatch(self, hidden, top_k_index, num_local_experts):
        permuted, tokens_per_expert, row_map = moe_permute(hidden, top_k_index, num_local_experts)
        return Dispatched(permuted, tokens_per_expert, row_map)

    def combine(self, expert_out, dispatched, top_k_weights):
        return moe_unpermute(expert_out, dispatched.handle, top_k_weights)


LOCAL_DISPATCHER = LocalTokenDispatcher()


def expert_of_rows(tokens_per_expert: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows,) int64: the expert of each row of rows grouped by expert, for experts that take ids
    (Hugging Face's signature) instead of group sizes. ``rows`` is the host-known total, passed so
    that ``repeat_interleave`` does not read it from the device."""
    experts = torch.arange(tokens_per_expert.shape[0], device=tokens_per_expert.device)
    return experts.repeat_interleave(tokens_per_expert, output_size=rows)


__all__ = ['Dispatched', 'LOCAL_DISPATCHER', 'LocalTokenDispatcher', 'TokenDispatcher', 'expert_of_rows']
