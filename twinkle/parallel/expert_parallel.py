"""Expert parallelism: each rank of the mesh's 'ep' dim holds ``num_experts / ep_size`` experts.

A token is routed as in one process; its k copies travel to the ranks owning the chosen experts,
the owners run their experts over what they received, and the results travel back to be weighted
and summed in token order. ``apply_expert_parallel`` does not copy an experts forward for this: it
slices the expert parameters and gives each experts module an ``AllToAllTokenDispatcher`` (the
token-dispatcher interface of ``twinkle.kernels.moe.dispatch``, torchtitan's shape). Splits are
uneven: counts are exchanged first. Every rank joins every collective, also one that sends or
receives no rows, because an all-to-all only completes when all ranks of the group enter it.

    model = apply_expert_parallel(model, DeviceMesh.from_sizes(ep_size=2))
    model = parallelize(get_peft_model(model, lora_config), mesh)   # LoRA and FSDP2 on top

Twinkle's experts (a kernelized model) take the dispatcher in place of the local one. Hugging
Face's own experts (a model loaded without kernelize, ``kernels=None``) stay Hugging Face's: their
class gets a forward that runs HF's own forward between dispatch and combine (one log line says so).

Parameters that exist per EP rank (the experts and peft's LoRA on them) are tagged with their EP
group (``expert_parallel_group``) so that clipping sums their norms over it; ``expert_checkpoint``
converts them between this rank's slice and the full tensors one process would hold.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Tuple

import torch
import torch.distributed as dist
from torch import nn

from twinkle.kernels import families
from twinkle.kernels.moe import TwinkleMoeExperts, moe_permute, moe_unpermute
from twinkle.kernels.moe.dispatch import Dispatched, TokenDispatcher, expert_of_rows
from twinkle.utils.logger import get_logger

from .collectives import collective
from .mesh import DeviceMesh

logger = get_logger(__name__)


class _AllToAll(torch.autograd.Function):
    """Rows to peers with uneven splits (host ints); the gradient takes the reverse trip."""

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


def _rows_per_rank(send_counts: torch.Tensor, recv_counts: torch.Tensor) -> Tuple[List[int], List[int]]:
    """Rows to and from each peer, as the Python ints all_to_all_single takes: ONE host read for both."""
    both = torch.stack([send_counts, recv_counts])
    send_splits, recv_splits = both.reshape(2, send_counts.shape[0], -1).sum(dim=2).tolist()
    return send_splits, recv_splits


def _exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """What each peer sends us: row r of the result is peer r's ``send_counts[my rank]``."""
    recv_counts = torch.empty_like(send_counts)
    with collective('ep_exchange_counts'):
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


def _send_rows(rows: torch.Tensor, send_counts: torch.Tensor, group):
    """The count exchange, the one host read of the splits, the rows' trip:
    (received, recv_counts, send_splits, recv_splits)."""
    recv_counts = _exchange_counts(send_counts, group)
    send_splits, recv_splits = _rows_per_rank(send_counts, recv_counts)
    if sum(send_splits) != rows.shape[0]:  # host ints already read for the splits: no extra sync
        raise ValueError(f'send_counts must sum to the rows of rows ({rows.shape[0]}), got {sum(send_splits)}')
    received = _AllToAll.apply(rows, send_splits, recv_splits, group, 'ep_dispatch')
    return received, recv_counts, send_splits, recv_splits


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
    received, recv_counts, _, _ = _send_rows(rows, send_counts, group)
    return received, recv_counts


def all_to_all_combine(rows: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor,
                       group=None) -> torch.Tensor:
    """The reverse trip of ``all_to_all_dispatch``: ``rows``, one per row it returned and in that
    order, go back to their sources, which get them in the order they sent them. (Reads the counts
    to the host once; ``AllToAllTokenDispatcher`` keeps the splits of its dispatch instead.)"""
    send_splits, recv_splits = _rows_per_rank(send_counts, recv_counts)
    return _AllToAll.apply(rows, recv_splits, send_splits, group, 'ep_combine')


class _AllToAllHandle(NamedTuple):
    row_map: torch.Tensor      # token slots -> rows of the permuted tensor this rank sent
    arrival_map: torch.Tensor  # received rows (arrival order) -> rows grouped by local expert
    send_splits: List[int]     # rows sent to each rank
    recv_splits: List[int]     # rows received from each rank


class AllToAllTokenDispatcher(TokenDispatcher):
    """Dispatch = permute by global expert + all-to-all of the counts, then of the rows, + regroup
    by local expert; combine = the reverse, then the weighted sum in token order.

    It also says which experts this rank holds (``ep_group``, ``first_expert``, ``local_experts``
    and ``num_experts``, the global count the router chooses from), which FSDP and the checkpoint
    conversion read.

    Host syncs: ONE per layer, in dispatch, after the count exchange: the rows to and from every
    peer are read to the host together, as the split sizes ``all_to_all_single`` takes. That read is
    inherent to a variable-size all-to-all (torchtitan reads its counts once per layer too); the
    combine and both backward all-to-alls reuse those splits, and everything else (permutes,
    regroup, the received total as ``repeat_interleave``'s ``output_size``) stays on the device.
    """

    def __init__(self, group, num_experts: int):
        ep_size = dist.get_world_size(group)
        if num_experts % ep_size:
            raise ValueError(f'ep_size={ep_size} must divide the expert count num_experts={num_experts}')
        self.ep_group, self.num_experts = group, num_experts
        self.local_experts = num_experts // ep_size
        self.first_expert = dist.get_rank(group) * self.local_experts

    @property
    def ep_size(self) -> int:
        return self.num_experts // self.local_experts

    def dispatch(self, hidden, top_k_index, num_local_experts):
        if num_local_experts != self.local_experts:
            raise ValueError(f'num_local_experts must be the {self.local_experts} experts this rank holds, '
                             f'got {num_local_experts}')
        # Global expert order is destination-rank order: rank r owns experts [r * L, (r + 1) * L).
        permuted, tokens_per_expert, row_map = moe_permute(hidden, top_k_index, self.num_experts)
        send_counts = tokens_per_expert.view(self.ep_size, self.local_experts)
        received, recv_counts, send_splits, recv_splits = _send_rows(permuted, send_counts, self.ep_group)
        # Received rows come grouped by source rank, then by local expert; the experts need them by expert.
        local_expert = expert_of_rows(recv_counts.flatten(), received.shape[0]) % self.local_experts
        grouped, tokens_per_local_expert, arrival_map = moe_permute(received, local_expert.unsqueeze(1),
                                                                    self.local_experts)
        return Dispatched(grouped, tokens_per_local_expert,
                          _AllToAllHandle(row_map, arrival_map, send_splits, recv_splits))

    def combine(self, expert_out, dispatched, top_k_weights):
        handle = dispatched.handle
        unit_weights = torch.ones(handle.arrival_map.shape, dtype=expert_out.dtype, device=expert_out.device)
        in_arrival_order = moe_unpermute(expert_out, handle.arrival_map, unit_weights)
        returned = _AllToAll.apply(in_arrival_order, handle.recv_splits, handle.send_splits, self.ep_group,
                                   'ep_combine')
        return moe_unpermute(returned, handle.row_map, top_k_weights)


class _HuggingFaceExpertsFedByDispatcher:
    """Put before a Hugging Face experts class: HF's own forward (whichever
    ``config._experts_implementation``) computes the rows the dispatcher brings, each as a top-1
    choice of weight 1 of its local expert; the dispatcher takes the results back."""

    token_dispatcher: TokenDispatcher

    def forward(self, hidden_states, top_k_index, top_k_weights):
        dispatched = self.token_dispatcher.dispatch(hidden_states, top_k_index, self.num_experts)
        rows = dispatched.rows
        if rows.shape[0]:
            expert_ids = expert_of_rows(dispatched.tokens_per_expert, rows.shape[0]).unsqueeze(1)
            expert_out = super().forward(rows, expert_ids, rows.new_ones(expert_ids.shape))
        else:
            # No rows here. HF's eager loop would return a tensor outside the graph; this rank's
            # backward must still reach the combine's all-to-all and these parameters (FSDP reduces
            # their gradients over ranks), so run expert 0 on one zero row that depends on rows.
            one_row = rows.sum(dim=0, keepdim=True)
            expert_out = super().forward(one_row, top_k_index.new_zeros(1, 1), one_row.new_ones(1, 1))[:0]
        return self.token_dispatcher.combine(expert_out, dispatched, top_k_weights)


_fed_classes: Dict[type, type] = {}


def _fed_by_dispatcher(cls: type) -> type:
    """``cls`` with the dispatching forward first; it keeps HF's name, so the family still knows it."""
    if cls not in _fed_classes:
        _fed_classes[cls] = type(cls.__name__, (_HuggingFaceExpertsFedByDispatcher, cls),
                                 {'__module__': cls.__module__, '__qualname__': cls.__qualname__})
    return _fed_classes[cls]


def _is_experts(module: nn.Module) -> bool:
    return isinstance(module, TwinkleMoeExperts) or families.role_of(type(module)) == 'experts'


def _dispatcher_of(module: nn.Module):
    """The all-to-all dispatcher installed on ``module`` itself (not one a peft wrapper forwards to)."""
    dispatcher = vars(module).get('token_dispatcher')
    return dispatcher if isinstance(dispatcher, AllToAllTokenDispatcher) else None


def _keep_local_experts(module: nn.Module, dispatcher: AllToAllTokenDispatcher) -> None:
    """Replace the expert parameters by this rank's slice; ``num_experts`` becomes the count held."""
    others = [name for name, _ in module.named_parameters(recurse=False) if name not in families.EXPERT_PARAMETERS]
    if others:
        raise ValueError(f'{type(module).__name__} has parameters {others} besides {families.EXPERT_PARAMETERS}: '
                         f'expert parallelism slices only fused expert weights')
    owned = slice(dispatcher.first_expert, dispatcher.first_expert + dispatcher.local_experts)
    for name in families.EXPERT_PARAMETERS:
        full = getattr(module, name)
        setattr(module, name, nn.Parameter(full.detach()[owned].clone(), requires_grad=full.requires_grad))
    module.num_experts = dispatcher.local_experts


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Keep on each rank only its EP slice of every experts module and give each an all-to-all
    dispatcher over ``mesh.group('ep')``. In place; returns ``model``.

    Apply before FSDP and before peft (peft's expert LoRA must see the sliced parameters).
    """
    ep_size = mesh.size('ep')
    experts_modules = [module for module in model.modules() if _is_experts(module)]
    for module in experts_modules:
        if module.num_experts % ep_size:
            raise ValueError(f'ep_size={ep_size} must divide the expert count num_experts={module.num_experts} '
                             f'of {type(module).__name__}')
    if ep_size == 1:
        return model
    if not experts_modules:
        raise ValueError(f'ep_size={ep_size} but {type(model).__name__} has no fused MoE experts to distribute '
                         f'(twinkle.kernels.families knows {", ".join(families.classes_playing("experts"))})')
    if any(module is not module.get_base_layer() for module in model.modules() if hasattr(module, 'get_base_layer')
           and _is_experts(module.get_base_layer())):
        raise ValueError('the experts already carry peft adapters sized for all experts: call '
                         'apply_expert_parallel before get_peft_model / add_adapter_to_model')
    if any(_dispatcher_of(module) for module in experts_modules):
        raise ValueError(f'{type(model).__name__} is already expert-parallel: apply_expert_parallel once')
    group = mesh.group('ep')
    kept_hf_classes = {}
    for module in experts_modules:
        dispatcher = AllToAllTokenDispatcher(group, module.num_experts)
        _keep_local_experts(module, dispatcher)
        if not isinstance(module, TwinkleMoeExperts):
            kept_hf_classes[type(module)] = getattr(getattr(module, 'config', None), '_experts_implementation', None)
            module.__class__ = _fed_by_dispatcher(type(module))
        module.token_dispatcher = dispatcher
    for cls, implementation in kept_hf_classes.items():
        logger.info("expert parallel: %s stays Hugging Face's own experts (implementation %r; kernelize did not "
                    "replace them), fed by the all-to-all dispatcher", cls.__name__, implementation)
    logger.info('expert parallel: ep_size=%d, this rank holds experts %d-%d of %d in each of %d MoE layers',
                ep_size, dispatcher.first_expert, dispatcher.first_expert + dispatcher.local_experts - 1,
                dispatcher.num_experts, len(experts_modules))
    return model


def expert_units(model: nn.Module) -> Iterator[Tuple[str, nn.Module, AllToAllTokenDispatcher]]:
    """(name, unit, dispatcher) for every expert-parallel experts module: the unit is the module
    with its peft wrappers (the outermost module whose base layer it is), all of whose parameters
    are expert-local; the dispatcher says which experts this rank holds. ``parallelize`` makes each
    unit an FSDP unit over the EP-complement."""
    claimed = set()
    for name, module in model.named_modules():  # pre-order: a wrapper comes before what it wraps
        base = module.get_base_layer() if hasattr(module, 'get_base_layer') else module
        dispatcher = _dispatcher_of(base)
        if dispatcher is not None and id(base) not in claimed:
            claimed.add(id(base))
            yield name, module, dispatcher


@dataclass
class DispatchedBytes:
    total: int = 0  # bytes the dispatch all-to-alls sent from this rank (to every rank, itself included)
    calls: int = 0  # dispatches counted (layers x forward passes)


class _CountingDispatcher(TokenDispatcher):
    def __init__(self, inner: AllToAllTokenDispatcher, counter: DispatchedBytes):
        self.inner, self.counter = inner, counter

    def dispatch(self, hidden, top_k_index, num_local_experts):
        dispatched = self.inner.dispatch(hidden, top_k_index, num_local_experts)
        self.counter.total += sum(dispatched.handle.send_splits) * hidden.shape[-1] * hidden.element_size()
        self.counter.calls += 1
        return dispatched

    def combine(self, expert_out, dispatched, top_k_weights):
        return self.inner.combine(expert_out, dispatched, top_k_weights)


@contextlib.contextmanager
def count_dispatched_bytes(model: nn.Module) -> Iterator[DispatchedBytes]:
    """Test and benchmark hook: while open, every expert-parallel layer of ``model`` counts the rows
    its dispatch sends (the split sizes the all-to-all moves, times the row size), e.g. to check
    that no capacity padding or duplicate rows travel. Nothing is counted outside it."""
    counter = DispatchedBytes()
    modules = [module for module in model.modules() if _dispatcher_of(module)]
    for module in modules:
        module.token_dispatcher = _CountingDispatcher(module.token_dispatcher, counter)
    try:
        yield counter
    finally:
        for module in modules:
            module.token_dispatcher = module.token_dispatcher.inner


_EP_GROUP_ATTR = '_twinkle_ep_group'


def mark_expert_local(module: nn.Module, group) -> None:
    """Tag ``module``'s parameters as held per EP rank (call again after FSDP replaces them)."""
    for parameter in module.parameters():
        setattr(parameter, _EP_GROUP_ATTR, group)


def expert_parallel_group(parameter: torch.Tensor):
    """The EP group over which ``parameter`` differs per rank, or None for a parameter every rank has."""
    return getattr(parameter, _EP_GROUP_ATTR, None)


__all__ = ['AllToAllTokenDispatcher', 'DispatchedBytes', 'all_to_all_combine', 'all_to_all_dispatch',
           'apply_expert_parallel', 'count_dispatched_bytes', 'expert_parallel_group', 'expert_units',
           'mark_expert_local']
