"""A twinkle ``DeviceMesh`` as megatron-core's process groups (tensor, pipeline, context, data, expert).

Both libraries lay ranks out in a fixed order, so no rank needs a table: twinkle row-major over
``pp, dp, fsdp, ep, cp, ulysses, tp`` (tp fastest), Megatron by ``order='tp-cp-ep-dp-pp'`` (tp
fastest, then cp, then its data-parallel ranks, pp slowest). Megatron's data-parallel ranks are
twinkle's data ranks (dp x ep; ep sits inside dp in both), and its expert-parallel groups are
twinkle's ep groups. The two agree whenever cp and ep are not both > 1 (Megatron then spreads
experts over cp x dp ranks); ``initialize_megatron_groups`` checks every group against the mesh
before it creates any, so a layout that disagrees is an error, never a silent re-mapping.
"""
from __future__ import annotations

import datetime
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from twinkle.parallel.mesh import DATA_DIMS, DeviceMesh
from twinkle.utils.logger import get_logger

logger = get_logger(__name__)

MEGATRON_ORDER = 'tp-cp-ep-dp-pp'  # megatron-core's default, spelled out: the check below depends on it
APPLIED_DIMS = ('pp', 'dp', 'ep', 'cp', 'tp')
_INSTEAD = {
    'fsdp': 'use dp_size: MegatronModel shards optimizer state over the data ranks with its distributed optimizer',
    'ulysses': 'use cp_size: Megatron splits long sequences with context parallelism',
}
# Megatron group -> the mesh dims its ranks differ along.
_DENSE_GROUPS = {'tp': ('tp',), 'cp': ('cp',), 'pp': ('pp',), 'dp': DATA_DIMS}
_EXPERT_GROUPS = {'ep': ('ep',)}


def initialize_megatron_groups(device_mesh: DeviceMesh, *, timeout: datetime.timedelta,
                               virtual_pipeline_stages: Optional[int] = None, seed: Optional[int] = None) -> None:
    """Create megatron-core's process groups for ``device_mesh`` (tp, pp, cp, ep; dp from the rest).

    Everything is checked before the first group exists: the dims Megatron applies, the world
    size, and that each of Megatron's groups holds the same ranks, in the same order, as the mesh.
    On a CPU mesh the CPU shim is applied first. ``seed`` (optional) seeds the tensor-parallel RNG
    states (``model_parallel_cuda_manual_seed``: tp ranks draw differently inside tp regions).
    ``timeout`` bounds every collective on the new groups.
    """
    from twinkle.model.megatron import require_megatron
    require_megatron()
    from megatron.core import parallel_state, tensor_parallel
    check_megatron_mesh(device_mesh)
    if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f'timeout must be a positive datetime.timedelta, got {timeout!r}')
    if not dist.is_initialized():
        raise RuntimeError('the process group is not initialised: call twinkle.initialize() under torchrun '
                           'before initialize_megatron_groups')
    if dist.get_world_size() != device_mesh.world_size:
        raise ValueError(f'device_mesh has {device_mesh.world_size} ranks ({device_mesh.describe_sizes()}) but '
                         f'WORLD_SIZE={dist.get_world_size()}: launch with torchrun '
                         f'--nproc_per_node={device_mesh.world_size} or change the sizes')
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron-core's process groups already exist: call destroy_megatron_groups() first")
    check_rank_order(device_mesh)
    if device_mesh.resolved_device_type() == 'cpu':
        from twinkle.model.megatron.cpu_shim import apply_cpu_shim
        apply_cpu_shim('cpu')
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=device_mesh.size('tp'), pipeline_model_parallel_size=device_mesh.size('pp'),
        context_parallel_size=device_mesh.size('cp'), expert_model_parallel_size=device_mesh.size('ep'),
        virtual_pipeline_model_parallel_size=virtual_pipeline_stages, order=MEGATRON_ORDER,
        distributed_timeout_minutes=timeout.total_seconds() / 60)
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    logger.info('megatron-core process groups for %s (data ranks: %d, order %s)', device_mesh.describe_sizes(),
                device_mesh.data_world_size, MEGATRON_ORDER)


def destroy_megatron_groups() -> None:
    """Forget megatron-core's groups (its module globals), so another mesh can be initialised."""
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()


def check_megatron_mesh(device_mesh: DeviceMesh) -> None:
    """The dims check, which needs no process group: a mesh dim Megatron does not apply is an error."""
    if not isinstance(device_mesh, DeviceMesh):
        raise ValueError(f'device_mesh must be a twinkle DeviceMesh, got {type(device_mesh).__name__}')
    device_mesh.refuse_unapplied(APPLIED_DIMS, 'MegatronModel', _INSTEAD)


def check_rank_order(device_mesh: DeviceMesh) -> None:
    """Raise unless each of Megatron's groups (from its own RankGenerator, before any group exists)
    lists the same ranks in the same order as the mesh, so that Megatron's tp/pp/cp/dp/ep rank of
    every process is its mesh coordinate (its data rank for dp)."""
    megatron_groups = _megatron_rank_groups(device_mesh)
    for name, dims in {**_DENSE_GROUPS, **_EXPERT_GROUPS}.items():
        expected = mesh_rank_groups(device_mesh, dims)
        if megatron_groups[name] != expected:
            raise ValueError(f"device_mesh {device_mesh.describe_sizes()}: Megatron's {name} groups "
                             f'{megatron_groups[name]} differ from the mesh\'s {expected} (the layouts agree '
                             f'unless cp_size and ep_size are both > 1)')


def mesh_rank_groups(device_mesh: DeviceMesh, dims: Tuple[str, ...]) -> List[List[int]]:
    """The mesh's groups along ``dims``: ranks differing only there, each in rank (= coordinate) order."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for rank in range(device_mesh.world_size):
        where = device_mesh.coordinate(rank)
        groups.setdefault(tuple(index for name, index in where.items() if name not in dims), []).append(rank)
    return sorted(groups.values())


def _megatron_rank_groups(device_mesh: DeviceMesh) -> Dict[str, List[List[int]]]:
    """The groups megatron-core's ``initialize_model_parallel`` would create for this mesh, as rank
    lists: its RankGenerators built with the same arguments (pure arithmetic, no communication)."""
    from megatron.core.parallel_state import RankGenerator
    tp, pp, cp, ep = (device_mesh.size(name) for name in ('tp', 'pp', 'cp', 'ep'))
    world = device_mesh.world_size
    dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp * cp), pp=pp, cp=cp, order=MEGATRON_ORDER)
    expert = RankGenerator(tp=tp, ep=ep, dp=world // (tp * ep * pp), pp=pp, cp=1, order=MEGATRON_ORDER)
    groups = {name: sorted(dense.get_ranks(name)) for name in _DENSE_GROUPS}
    groups.update({name: sorted(expert.get_ranks(name)) for name in _EXPERT_GROUPS})
    return groups
