"""Process set-up shared by every entry point: device, process group, mesh, seeds."""
from __future__ import annotations

import atexit
import datetime
import math
import os
import random
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from . import backends
from .parallel.collectives import collective
from .parallel.mesh import DeviceMesh, set_global_mesh
from .utils.logger import get_logger
from .utils.process_state import process_state

logger = get_logger(__name__)

# The collective timeout when initialize() is given none. torch's own default (30 minutes for gloo,
# 10 for nccl) lets a stalled CPU job sit idle for half an hour before anyone hears of it; on CPU
# and gloo five minutes is far above any healthy wait (the slowest is a first-run C++ kernel build,
# about a minute) and still short enough to notice. Accelerator jobs keep torch's default: their
# first steps may compile kernels for many minutes.
DEFAULT_CPU_TIMEOUT = datetime.timedelta(minutes=5)


RAY_ARGUMENTS = ('groups', 'nproc_per_node', 'lazy_collect', 'ray_address', 'call_timeout', 'start_timeout')


def initialize(mode: str = 'local', global_device_mesh: Optional[DeviceMesh] = None, seed: Optional[int] = 42,
               full_determinism: bool = False, timeout: Union[None, float, datetime.timedelta] = None, **kwargs):
    """Detect the device, join the torchrun job (if any), record the mesh and seed every RNG.

    ``mode='ray'`` (``groups=[DeviceGroup(...)]``, ``nproc_per_node``, ``lazy_collect=True``,
    ``ray_address``, ``call_timeout``, ``start_timeout``): this process becomes the driver of a Ray
    job; each group a placement group of rank actors that run torchrun-style among themselves, and
    components built with ``remote_group=`` are proxies of them (``twinkle.infra``). ``timeout`` is
    then the actors' collective timeout. Returns the driver's ``RayCluster``.

    Under torchrun (RANK and WORLD_SIZE set) this creates the default process group with the device
    layer's backend (gloo, nccl, hccl) and checks that ``global_device_mesh`` spans WORLD_SIZE ranks
    (default mesh: FSDP over all of them). ``timeout`` (seconds or a timedelta) bounds every
    collective; a stalled rank then fails the job with a ``CollectiveTimeout``. Every rank gets the
    same seed, so every rank builds the same initial weights. Returns the device backend.
    """
    if mode == 'ray':
        return _initialize_ray(global_device_mesh, seed, full_determinism, timeout, kwargs)
    if mode != 'local':
        raise ValueError(f'mode={mode!r} is not supported; valid: "local" (torchrun or a single process), "ray"')
    if kwargs:
        raise TypeError(f'initialize() got unsupported arguments: {", ".join(sorted(kwargs))}')
    if global_device_mesh is not None and not isinstance(global_device_mesh, DeviceMesh):
        raise ValueError(f'global_device_mesh must be a twinkle DeviceMesh, got {type(global_device_mesh).__name__}')
    timeout = _as_timedelta(timeout)
    under_torchrun = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    world_size = int(os.environ['WORLD_SIZE']) if under_torchrun else 1
    mesh = global_device_mesh or _default_mesh(world_size)
    if mesh.world_size != world_size:
        launched = f'torchrun started WORLD_SIZE={world_size}' if under_torchrun else 'this is a single process'
        raise ValueError(f'global_device_mesh has {mesh.world_size} ranks ({mesh.describe_sizes()}) but {launched}; '
                         f'launch with torchrun --nproc_per_node={mesh.world_size} or change the sizes')
    device = backends.current()
    if under_torchrun:
        _join_process_group(device, timeout)
    set_global_mesh(mesh)
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    if full_determinism:
        torch.use_deterministic_algorithms(True)
    return device


def _initialize_ray(global_device_mesh, seed, full_determinism, timeout, kwargs):
    unknown = sorted(set(kwargs) - set(RAY_ARGUMENTS))
    if unknown:
        raise TypeError(f"initialize(mode='ray') got unsupported arguments: {', '.join(unknown)}; "
                        f"valid: {', '.join(RAY_ARGUMENTS)}")
    if global_device_mesh is not None and not isinstance(global_device_mesh, DeviceMesh):
        raise ValueError(f'global_device_mesh must be a twinkle DeviceMesh, got {type(global_device_mesh).__name__}')
    from .infra.ray_mode import initialize_ray
    seconds = _as_timedelta(timeout)
    groups = kwargs.pop('groups', None)
    groups = [groups] if groups is not None and not isinstance(groups, (list, tuple)) else groups
    if global_device_mesh is not None and groups and global_device_mesh.world_size > max(len(g.ranks) for g in groups):
        raise ValueError(f'global_device_mesh has {global_device_mesh.world_size} ranks '
                         f'({global_device_mesh.describe_sizes()}), more than any group holds '
                         f'({", ".join(f"{g.name}: {len(g.ranks)}" for g in groups)})')
    if seed is not None:  # the driver's own RNGs (data order, sampling seeds drawn here)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    worker_init = dict(seed=seed, full_determinism=full_determinism,
                       timeout=None if seconds is None else seconds.total_seconds())
    return initialize_ray(groups or [], global_mesh=global_device_mesh, worker_init=worker_init, **kwargs)


def _default_mesh(world_size: int) -> DeviceMesh:
    if world_size > 1:
        logger.info('no global_device_mesh given: FSDP over all %d ranks (fsdp_size=%d)', world_size, world_size)
    return DeviceMesh.from_sizes(fsdp_size=world_size)


def _as_timedelta(timeout) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        seconds = None if timeout is None else timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise ValueError(f'timeout must be seconds (a number) or a timedelta, got {timeout!r}')
    if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f'timeout must be a positive, finite number of seconds, got {seconds}; '
                         f'a wait without end is a hang (omit timeout for the default)')
    return None if seconds is None else datetime.timedelta(seconds=seconds)


def _join_process_group(device: backends.Backend, timeout: Optional[datetime.timedelta]) -> None:
    """Create the default process group (unless the caller already did) and wait for every rank."""
    if dist.is_initialized():
        logger.info('process group already initialised (%s, %d ranks): kept', dist.get_backend(),
                    dist.get_world_size())
        return
    if device.torch_device_type != 'cpu':
        torch.accelerator.set_device_index(device.local_index())
    if timeout is None and device.dist_backend == 'gloo':
        timeout, origin = DEFAULT_CPU_TIMEOUT, 'twinkle default for gloo; initialize(timeout=...) changes it'
    else:
        origin = 'initialize(timeout=...)' if timeout is not None else 'torch default'
    dist.init_process_group(backend=device.dist_backend, timeout=timeout)
    atexit.register(_destroy_process_group)
    process_state().collective_timeout = timeout
    with collective('initialize'):
        dist.barrier()
    logger.info('process group: %s, %d ranks, collective timeout %s (%s)', device.dist_backend,
                dist.get_world_size(), timeout or 'torch default', origin)


def _destroy_process_group() -> None:
    """At exit, while the interpreter is whole: a gloo group left to the interpreter's teardown can
    abort the process ("terminate called without an active exception", pytorch/pytorch#190489),
    failing a job that finished. A no-op when the script destroyed it already."""
    if dist.is_initialized():
        dist.destroy_process_group()


def process_group_timeout() -> Optional[datetime.timedelta]:
    """The collective timeout ``initialize`` gave the process group (None: torch's default, or no group)."""
    return process_state().collective_timeout
