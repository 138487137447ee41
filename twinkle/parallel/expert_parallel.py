"""Expert parallelism: each rank of the mesh's 'ep' dim holds ``num_experts / ep_size`` experts.

A token is routed as in one process; its k copies travel to the ranks owning the chosen experts
(``all_to_all_dispatch``), the owners run their experts over what they received, and the results
travel back (``all_to_all_combine``) to be weighted and summed in token order. Splits are uneven:
counts are exchanged first. Every rank joins every collective, also one that sends or receives
no rows, because an all-to-all only completes when all ranks of the group enter it.

    model = apply_expert_parallel(model, DeviceMesh.from_sizes(ep_size=2))
    model = parallelize(get_peft_model(model, lora_config), mesh)   # LoRA and FSDP2 on top

Parameters that exist per EP rank (the experts and peft's LoRA on them) are tagged with their EP
group (``expert_parallel_group``) so that clipping sums their norms over it; ``expert_checkpoint``
converts them between this rank's slice and the full tensors one process would hold.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.distributed as dist
from torch import nn

from twinkle.kernels.moe import TwinkleMoeExperts, grouped_experts, moe_permute, moe_unpermute
from twinkle.utils.logger import get_logger

from .collectives import collective
from .mesh import DeviceMesh

logger = get_logger(__name__)


def _exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """What each peer sends us: row r of the result is peer r's ``send_counts[my rank]``."""
    recv_counts = torch.empty_like(send_counts)
    with collective('ep_exchange_counts'):
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


class _AllToAll(torch.autograd.Function):
    """Rows to peers with uneven splits; the gradient takes the reverse trip."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group, name):
        ctx.splits, ctx.group, ctx.name = (send_splits, recv_splits), group, name
        received = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        with collective(name):
            dist.all_to_all_single(received, rows.contiguous(), recv_splits, send_splits, group=group)
        return received

    @staticmethod
    def backward(ctx, grad_received):
        send_splits, recv_splits = ctx.splits
        grad_rows = _AllToAll.apply(grad_received, recv_splits, send_splits, ctx.group, f'{ctx.name}_backward')
        return grad_rows, None, None, None, None


def _row_splits(counts: torch.Tensor):
    """Rows per peer, as the Python ints all_to_all_single takes."""
    return counts.reshape(counts.shape[0], -1).sum(dim=1).tolist()


def all_to_all_dispatch(rows: torch.Tensor, send_counts: torch.Tensor, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Send ``rows`` (grouped by destination) to the ranks of ``group``; differentiable in ``rows``.

    ``send_counts`` (ranks, ...) integer: ``send_counts[r]`` describes the rows for rank r (e.g. per
    expert of r); rank r gets ``send_counts[r].sum()`` consecutive rows. Returns the received rows,
    grouped by source rank, and ``recv_counts`` of the same shape (``recv_counts[s]`` = what s sent).
    """
    ranks = dist.get_world_size(group)
    if send_counts.dim() < 1 or send_counts.shape[0] != ranks:
        raise ValueError(f'send_counts must have dim 0 equal to the {ranks} ranks of group, '
                         f'got shape {tuple(send_counts.shape)}')
    if int(send_counts.sum()) != rows.shape[0]:
        raise ValueError(f'send_counts must sum to the rows of rows ({rows.shape[0]}), got {int(send_counts.sum())}')
    recv_counts = _exchange_counts(send_counts, group)
    received = _AllToAll.apply(rows, _row_splits(send_counts), _row_splits(recv_counts), group, 'ep_dispatch')
    return received, recv_counts


def all_to_all_combine(rows: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor,
                       group=None) -> torch.Tensor:
    """The reverse trip of ``all_to_all_dispatch``: ``rows``, one per row it returned and in that
    order, go back to their sources, which get them in the order they sent them."""
    return _AllToAll.apply(rows, _row_splits(recv_counts), _row_splits(send_counts), group, 'ep_combine')


class ExpertParallelExperts(TwinkleMoeExperts):
    """The experts of one MoE block, of which this rank holds ``local_experts`` consecutive ones
    (``first_expert`` onwards); ``num_experts`` stays the global count the router chooses from."""

    ep_group = None
    first_expert = 0
    local_experts = 0
    dispatched_bytes = 0  # bytes this rank sent in dispatch so far (the communication-volume check)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        self._require_swiglu_layout()
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj  # through self: where peft's LoRA applies
        # Global expert order is destination-rank order: rank r owns experts [r * L, (r + 1) * L).
        permuted, tokens_per_expert, row_map = moe_permute(hidden_states.to(gate_up_proj.dtype), top_k_index,
                                                           self.num_experts)
        send_counts = tokens_per_expert.view(-1, self.local_experts)
        received, recv_counts = all_to_all_dispatch(permuted, send_counts, self.ep_group)
        self.dispatched_bytes += permuted.numel() * permuted.element_size()
        expert_out = self._run_local_experts(received, recv_counts, gate_up_proj, down_proj)
        returned = all_to_all_combine(expert_out, send_counts, recv_counts, self.ep_group)
        return moe_unpermute(returned, row_map, top_k_weights).to(hidden_states.dtype)

    def _run_local_experts(self, received, recv_counts, gate_up_proj, down_proj) -> torch.Tensor:
        """Received rows come grouped by source rank, then by local expert; the grouped experts need
        them grouped by expert, so regroup, run, and put them back in arrival order."""
        local_ids = torch.arange(self.local_experts, device=received.device).repeat(recv_counts.shape[0])
        local_ids = local_ids.repeat_interleave(recv_counts.flatten()).unsqueeze(1)
        grouped, tokens_per_local_expert, arrival_map = moe_permute(received, local_ids, self.local_experts)
        expert_out = grouped_experts(grouped, tokens_per_local_expert, gate_up_proj, down_proj)
        return moe_unpermute(expert_out, arrival_map, torch.ones_like(local_ids, dtype=expert_out.dtype))


_EP_GROUP_ATTR = '_twinkle_ep_group'


def _is_fused_experts(module: nn.Module) -> bool:
    return isinstance(module, TwinkleMoeExperts) or type(module).__name__ == 'Qwen3MoeExperts'


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Keep on each rank only its EP slice of every fused-experts module and route tokens to the
    owners through all-to-alls over ``mesh.group('ep')``. In place; returns ``model``.

    Apply before FSDP and before peft (peft's expert LoRA must see the sliced parameters).
    """
    ep_size = mesh.size('ep')
    experts_modules = [module for module in model.modules() if _is_fused_experts(module)]
    for module in experts_modules:
        if module.num_experts % ep_size:
            raise ValueError(f'ep_size={ep_size} must divide the expert count num_experts={module.num_experts} '
                             f'of {type(module).__name__}')
    if ep_size == 1:
        return model
    if not experts_modules:
        raise ValueError(f'ep_size={ep_size} but {type(model).__name__} has no fused MoE experts '
                         f'(Qwen3MoeExperts-style gate_up_proj/down_proj) to distribute')
    if any(module is not module.get_base_layer() for module in model.modules() if hasattr(module, 'get_base_layer')
           and _is_fused_experts(module.get_base_layer())):
        raise ValueError('the experts already carry peft adapters sized for all experts: call '
                         'apply_expert_parallel before get_peft_model / add_adapter_to_model')
    group = mesh.group('ep')
    ep_rank = dist.get_rank(group)
    for module in experts_modules:
        local = module.num_experts // ep_size
        owned = slice(ep_rank * local, (ep_rank + 1) * local)
        module.gate_up_proj = nn.Parameter(module.gate_up_proj.detach()[owned].clone())
        module.down_proj = nn.Parameter(module.down_proj.detach()[owned].clone())
        module.__class__ = ExpertParallelExperts
        module.ep_group, module.first_expert, module.local_experts = group, owned.start, local
    logger.info('expert parallel: ep_size=%d, this rank holds experts %d-%d of %d in each of %d MoE layers',
                ep_size, ep_rank * local, (ep_rank + 1) * local - 1, experts_modules[0].num_experts,
                len(experts_modules))
    return model


def expert_units(model: nn.Module) -> Iterator[Tuple[str, nn.Module, ExpertParallelExperts]]:
    """(name, unit, experts) for every expert-parallel experts module: the unit is the module with
    its peft wrappers (the outermost module whose base layer it is); all its parameters are
    expert-local. ``parallelize`` makes each unit an FSDP unit over the EP-complement."""
    claimed = set()
    for name, module in model.named_modules():  # pre-order: a wrapper comes before what it wraps
        base = module.get_base_layer() if hasattr(module, 'get_base_layer') else module
        if isinstance(base, ExpertParallelExperts) and id(base) not in claimed:
            claimed.add(id(base))
            yield name, module, base


def mark_expert_local(module: nn.Module, group) -> None:
    """Tag ``module``'s parameters as held per EP rank (call again after FSDP replaces them)."""
    for parameter in module.parameters():
        setattr(parameter, _EP_GROUP_ATTR, group)


def expert_parallel_group(parameter: torch.Tensor):
    """The EP group over which ``parameter`` differs per rank, or None for a parameter every rank has."""
    return getattr(parameter, _EP_GROUP_ATTR, None)


__all__ = ['ExpertParallelExperts', 'all_to_all_combine', 'all_to_all_dispatch', 'apply_expert_parallel',
           'expert_parallel_group', 'expert_units', 'mark_expert_local']
