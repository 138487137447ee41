"""``twinkle.initialize(mode='ray')``: the cluster, the driver's process state and the proxy factory."""
from __future__ import annotations

from typing import Optional, Sequence

from twinkle.utils.process_state import LOCAL, RAY_DRIVER, process_state

from .ray_cluster import RayCluster

# A training call (a step of a large model, a first-use kernel build) may take long; an hour is far
# above any healthy call and still ends a hang. Start-up: placement and process-group set-up.
DEFAULT_CALL_TIMEOUT_S = 3600.0
DEFAULT_START_TIMEOUT_S = 300.0


def initialize_ray(groups: Sequence, *, global_mesh=None, nproc_per_node: Optional[int] = None,
                   lazy_collect: bool = True, ray_address: Optional[str] = None, worker_init: Optional[dict] = None,
                   call_timeout: Optional[float] = None, start_timeout: Optional[float] = None) -> RayCluster:
    if not isinstance(lazy_collect, bool):
        raise ValueError(f'lazy_collect must be True or False, got {lazy_collect!r}')
    if nproc_per_node is not None and (not isinstance(nproc_per_node, int) or nproc_per_node < 1):
        raise ValueError(f'nproc_per_node must be a positive int, got {nproc_per_node!r}')
    state = process_state()
    if state.cluster is not None:
        state.cluster.shutdown()
    cluster = RayCluster(groups, nproc_per_node=nproc_per_node, global_mesh=global_mesh, lazy_collect=lazy_collect,
                         ray_address=ray_address, worker_init=worker_init or {},
                         call_timeout=_positive('call_timeout', call_timeout, DEFAULT_CALL_TIMEOUT_S),
                         start_timeout=_positive('start_timeout', start_timeout, DEFAULT_START_TIMEOUT_S))
    state.role, state.cluster, state.mesh, state.proxy_factory = RAY_DRIVER, cluster, global_mesh, _proxy
    return cluster


def shutdown_ray() -> None:
    """Stop the groups (and the local cluster this driver started); the process is local again."""
    state = process_state()
    if state.cluster is not None:
        state.cluster.shutdown()
    state.cluster, state.role, state.proxy_factory = None, LOCAL, None


def _proxy(cls, remote_group, args, kwargs):
    from .ray_proxy import RemoteComponent
    cluster = process_state().cluster
    return RemoteComponent(cluster, cluster.group(remote_group), cls, args, kwargs)


def _positive(name: str, value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'{name} must be a positive number of seconds, got {value!r}')
    return float(value)
