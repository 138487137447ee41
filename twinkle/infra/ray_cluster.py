"""Ray mode's driver side: each ``DeviceGroup`` becomes a placement group of rank actors.

``RayCluster`` connects to a running cluster (``ray_address``, or RAY_ADDRESS) or starts a local
one, checks the groups against the cluster's resources before asking for them (a placement group
that cannot be placed would otherwise stay pending forever), reserves one bundle per rank, starts
one ``RankWorker`` per bundle with its rank's torchrun-style environment, and lets every group
initialise torch.distributed among its own actors. ``gather`` is the one place the driver waits on
actors: bounded by ``call_timeout``, and a rank that fails or dies fails the call by its name.
"""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from twinkle.utils.logger import get_logger

from .errors import RemoteGroupError, RemoteTimeout, require_ray
from .ray_worker import RankWorker, free_endpoint

logger = get_logger(__name__)

# device_type -> (the Ray resource one rank reserves, TWINKLE_DEVICE for the actor or None: detect)
_DEVICE_RESOURCES = {'cpu': ('CPU', 'cpu'), 'gpu': ('GPU', None), 'cuda': ('GPU', None), 'npu': ('NPU', 'npu')}
# Environment a driver hands its actors (a remote cluster's workers do not inherit the driver's).
_FORWARDED_PREFIXES = ('TWINKLE_', 'HF_', 'TRANSFORMERS_', 'OMP_NUM_THREADS', 'MODELSCOPE_')
# Ranks that failed: how long the other ranks get to fail the same way before they count as stuck
# in a collective with the failed one (then the group is stopped).
FAILURE_GRACE_S = 10.0


@dataclass
class GroupHandle:
    name: str
    size: int
    device_type: str
    actors: List[Any]
    mesh: Any
    placement_group: Any = None
    pids: List[int] = field(default_factory=list)
    broken: Optional[str] = None  # why the group was stopped


class RayCluster:
    def __init__(self, groups: Sequence, *, nproc_per_node: Optional[int], global_mesh, lazy_collect: bool,
                 ray_address: Optional[str], worker_init: dict, call_timeout: float, start_timeout: float):
        self.ray = require_ray()
        _check_groups(groups)
        self.lazy_collect, self.call_timeout, self.start_timeout = lazy_collect, call_timeout, start_timeout
        self.nproc_per_node = nproc_per_node
        self.global_mesh = global_mesh
        self.started_ray = self._connect(ray_address, groups)
        self.groups: Dict[str, GroupHandle] = {}
        self.sync_endpoints: Dict[tuple, tuple] = {}  # (model, sampler) proxy handles -> sync group address
        self.deferred: List[Any] = []  # LazyResults not resolved yet
        atexit.register(self.shutdown)
        try:
            self._check_resources(groups)
            for group in groups:
                self.groups[group.name] = self._start_group(group, worker_init)
        except BaseException:
            self.shutdown()
            raise

    # -- start-up ---------------------------------------------------------------------------------
    def _connect(self, ray_address: Optional[str], groups) -> bool:
        ray = self.ray
        if ray.is_initialized():
            logger.info('ray: already connected (%s)', ray.get_runtime_context().gcs_address)
            return False
        address = ray_address or os.environ.get('RAY_ADDRESS')
        if address:
            ray.init(address=address, log_to_driver=True)
            logger.info('ray: connected to the cluster at %s', address)
            return False
        # A local cluster gets a logical CPU per CPU rank at least: CPU ranks are processes, not cores.
        cpu_ranks = sum(len(group.ranks) for group in groups if _device_type(group) == 'cpu')
        num_cpus = max(os.cpu_count() or 1, cpu_ranks + 1)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info('ray: started a local cluster with %d logical CPUs (%d CPU ranks requested)', num_cpus, cpu_ranks)
        return True

    def _check_resources(self, groups) -> None:
        available = self.ray.cluster_resources()
        needed: Dict[str, float] = {}
        for group in groups:
            resource = _DEVICE_RESOURCES[_device_type(group)][0]
            needed[resource] = needed.get(resource, 0) + len(group.ranks)
            if resource != 'CPU':
                needed['CPU'] = needed.get('CPU', 0) + len(group.ranks)
            if needed[resource] > available.get(resource, 0):
                have = ', '.join(f'{key}: {value:g}' for key, value in sorted(available.items())
                                 if key in ('CPU', 'GPU', 'NPU'))
                raise ValueError(f'DeviceGroup {group.name!r} needs {len(group.ranks)} x {resource} ({needed[resource]:g} '
                                 f'with the groups before it) but the Ray cluster has {have or "none of CPU/GPU/NPU"}; '
                                 f'add nodes (ray start --address=...) or ask for fewer ranks')

    def _start_group(self, group, worker_init: dict) -> GroupHandle:
        """``worker_init``: the ``twinkle.initialize`` arguments every rank joins with (seed, timeout)."""
        ray = self.ray
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        device_type = _device_type(group)
        resource, forced_device = _DEVICE_RESOURCES[device_type]
        size = len(group.ranks)
        bundle = {'CPU': 1} if resource == 'CPU' else {'CPU': 1, resource: 1}
        started = time.perf_counter()
        pg = placement_group([dict(bundle) for _ in range(size)], strategy='PACK', name=f'twinkle-{group.name}')
        try:
            ray.get(pg.ready(), timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise RemoteTimeout(f'DeviceGroup {group.name!r}: Ray could not place {size} x {bundle} within '
                                f'{self.start_timeout:g} s (start_timeout): the resources exist but are taken, or no '
                                f'node has them') from None
        strategy = lambda index: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)  # noqa: E731
        host, port = ray.get(ray.remote(num_cpus=0)(free_endpoint).options(scheduling_strategy=strategy(0)).remote(),
                             timeout=self.start_timeout)
        nodes = placement_group_table(pg)['bundles_to_node_id']
        local_ranks = _local_ranks([nodes[index] for index in range(size)])
        worker_cls = ray.remote(RankWorker)
        actors = []
        for rank in range(size):
            env = {key: value for key, value in os.environ.items() if key.startswith(_FORWARDED_PREFIXES)}
            env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_ranks[rank][0]),
                       LOCAL_WORLD_SIZE=str(local_ranks[rank][1]), MASTER_ADDR=host, MASTER_PORT=str(port))
            if forced_device:
                env['TWINKLE_DEVICE'] = forced_device
            options = dict(num_cpus=1, scheduling_strategy=strategy(rank), runtime_env={'env_vars': env},
                           max_restarts=0, name=f'twinkle-{group.name}-{rank}-{os.getpid()}')
            if resource == 'GPU':
                options['num_gpus'] = 1
            elif resource != 'CPU':
                options['resources'] = {resource: 1}
            actors.append(worker_cls.options(**options).remote(group.name, worker_init))
        handle = GroupHandle(group.name, size, device_type, actors, self._group_mesh(group), pg)
        handle.pids = self.gather(handle, [actor.setup.remote(handle.mesh) for actor in actors], 'setup',
                                  timeout=self.start_timeout)
        logger.info('ray: group %r ready: %d %s rank(s) in %.1f s (master %s:%d)', group.name, size, device_type,
                    time.perf_counter() - started, host, port)
        return handle

    def _group_mesh(self, group):
        """The mesh a group's processes record as their global one: ``global_device_mesh`` when it
        spans the group (the seeds' single-group scripts), else FSDP over the group's ranks."""
        from twinkle.parallel.mesh import DeviceMesh
        if self.global_mesh is not None and self.global_mesh.world_size == len(group.ranks):
            return self.global_mesh
        return DeviceMesh.from_sizes(fsdp_size=len(group.ranks))

    # -- calls ------------------------------------------------------------------------------------
    def group(self, name: str) -> GroupHandle:
        if name not in self.groups:
            raise ValueError(f'remote_group={name!r} names no group; the groups given to twinkle.initialize are: '
                             f'{", ".join(sorted(self.groups)) or "none"}')
        handle = self.groups[name]
        if handle.broken:
            raise RemoteGroupError(f'group {name!r} was stopped earlier: {handle.broken}')
        return handle

    def gather(self, group: GroupHandle, refs: List[Any], what: str, timeout: Optional[float] = None,
               ranks: Optional[List[int]] = None) -> List[Any]:
        """Each rank's answer to ``refs`` (``ranks[i]`` answers ``refs[i]``), waited for at most
        ``timeout`` (default ``call_timeout``). A rank that raised re-raises here once the others
        answered too; a dead rank, or ranks left stuck beside a failed one, stop the group."""
        ray = self.ray
        ranks = list(range(len(refs))) if ranks is None else ranks
        timeout = self.call_timeout if timeout is None else timeout
        pending = dict(zip(refs, ranks))
        answers: Dict[int, Any] = {}
        failures: Dict[int, BaseException] = {}
        deadline = time.monotonic() + timeout
        grace_end = None
        while pending:
            left = deadline - time.monotonic() if grace_end is None else min(deadline, grace_end) - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0))
            if not ready:
                stuck = sorted(pending.values())
                if failures:
                    first = min(failures)
                    self._stop(group, f'rank {first} failed in {what} and ranks {stuck} stayed stuck')
                    raise failures[first]
                self._stop(group, f'ranks {stuck} did not answer {what} within {timeout:g} s')
                raise RemoteTimeout(f'group {group.name!r}: ranks {stuck} did not answer {what} within {timeout:g} s '
                                    f'(call_timeout); the group is stopped')
            rank = pending.pop(ready[0])
            try:
                answers[rank] = ray.get(ready[0])
            except ray.exceptions.RayActorError as error:
                pid = group.pids[rank] if rank < len(group.pids) else '?'
                reason = f'rank {rank} (pid {pid}) died during {what}'
                self._stop(group, reason)
                raise RemoteGroupError(f'group {group.name!r}: {reason}: {_first_line(error)}') from None
            except ray.exceptions.RayTaskError as error:
                failures[rank] = _user_error(error, group.name, rank, what)
                grace_end = grace_end or time.monotonic() + FAILURE_GRACE_S
        if failures:
            raise failures[min(failures)]  # the lowest failing rank: the same report whichever failed first
        return [answers[rank] for rank in ranks]

    def defer(self, lazy):
        """Keep a lazy answer until it is resolved: its failure must not go unseen, and the driver
        must not stop the actors while the call still runs (``shutdown`` waits for it)."""
        self.deferred.append(lazy)
        return lazy

    def settle(self, wait: bool = False) -> None:
        """Resolve the lazy answers that have arrived (all of them with ``wait``); a failed one raises."""
        pending, self.deferred = self.deferred, []
        for index, lazy in enumerate(pending):
            if lazy._done:  # already used: its failure, if any, was seen
                continue
            arrived = wait or not self.ray.wait(lazy._refs, num_returns=len(lazy._refs), timeout=0)[1]
            if not arrived:
                self.deferred.append(lazy)
                continue
            try:
                lazy.result()
            except BaseException:
                self.deferred.extend(item for item in pending[index + 1:])
                raise

    def _stop(self, group: GroupHandle, reason: str) -> None:
        """Kill the group's actors (ranks left in a collective would otherwise wait for its timeout)."""
        group.broken = reason
        for actor in group.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        logger.error('ray: group %r stopped: %s', group.name, reason)

    def shutdown(self) -> None:
        """Stop every group's actors and, if this driver started the local cluster, the cluster."""
        ray = self.ray
        if not ray.is_initialized():
            return
        while self.deferred:  # calls the driver never looked at (a last save) finish first
            try:
                self.settle(wait=True)
            except Exception as error:
                logger.error('ray: a call whose answer was never used failed: %s', error)
        from ray.util.placement_group import remove_placement_group
        for group in self.groups.values():
            for actor in group.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
            if group.placement_group is not None:
                try:
                    remove_placement_group(group.placement_group)
                except Exception:
                    pass
        self.groups = {}
        if self.started_ray:
            ray.shutdown()


def _device_type(group) -> str:
    device_type = (group.device_type or 'cpu').lower()
    if device_type not in _DEVICE_RESOURCES:
        raise ValueError(f'DeviceGroup {group.name!r}: device_type={group.device_type!r} is not one of '
                         f'{", ".join(sorted(_DEVICE_RESOURCES))} (GPU and cuda are the same)')
    return device_type


def _check_groups(groups) -> None:
    from twinkle.parallel.mesh import DeviceGroup
    if not groups:
        raise ValueError("twinkle.initialize(mode='ray') needs groups=[DeviceGroup(name, ranks, device_type), ...]")
    owner: Dict[int, str] = {}
    for group in groups:
        if not isinstance(group, DeviceGroup):
            raise ValueError(f'groups must hold DeviceGroup objects, got {type(group).__name__}')
        _device_type(group)
        if sum(other.name == group.name for other in groups) > 1:
            raise ValueError(f'DeviceGroup name {group.name!r} is used twice; each group needs its own name')
        shared = sorted(rank for rank in group.ranks if rank in owner)
        if shared:
            raise ValueError(f'DeviceGroup {group.name!r} and {owner[shared[0]]!r} both claim ranks {shared}; '
                             f'a rank (one device) belongs to one group')
        owner.update((rank, group.name) for rank in group.ranks)


def _local_ranks(nodes: List[str]) -> List[tuple]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) per bundle from the node each bundle was placed on."""
    counts: Dict[str, int] = {}
    seen: List[int] = []
    for node in nodes:
        seen.append(counts.get(node, 0))
        counts[node] = seen[-1] + 1
    return [(index, counts[node]) for index, node in zip(seen, nodes)]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _user_error(error, group: str, rank: int, what: str) -> BaseException:
    """The rank's own exception (its type, so callers can catch ValueError), its origin in the message."""
    cause = getattr(error, 'cause', None)
    if isinstance(cause, Exception):
        try:
            return type(cause)(f'{cause} [raised by group {group!r} rank {rank} in {what}]')
        except Exception:
            pass
    return RemoteGroupError(f'group {group!r} rank {rank} failed in {what}: {_first_line(error)}')
