"""``sync_weights`` between a model group and a sampler group of a Ray job.

The driver never touches the weights: the model group's first rank sends them over a standalone
process group (``ProcessGroupCheckpointEngine``: gloo on CPU, NCCL/HCCL on accelerators) to every
sampler rank, the other model ranks help gather FSDP shards, exactly as under torchrun roles. The
sync group is created on the first sync (its address: the model's first rank's node and a port
free there) and kept in each actor's process state for the next syncs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .ray_worker import free_endpoint

_ENGINES = 'ray.sync_engines'


def sync_between_groups(model, sampler, merge_and_sync: bool, adapter_name: Optional[str]) -> Dict[str, Any]:
    if model.remote_group == sampler.remote_group:
        raise ValueError(f'CheckpointEngineManager: model and sampler are both in group {model.remote_group!r}; '
                         f'Ray mode syncs between two groups (give the sampler its own DeviceGroup)')
    cluster = model._cluster
    key = (model._handle, sampler._handle)
    endpoints = cluster.sync_endpoints
    if key not in endpoints:
        endpoints[key] = model.remote_apply(_endpoint_on_first_rank)[0]
    host, port = endpoints[key]
    world_size = 1 + len(sampler._ranks)
    spec = dict(key=key, host=host, port=port, world_size=world_size, timeout=cluster.call_timeout)
    model_refs = [model._actor(rank).apply.remote(model._handle, _model_side, (spec, merge_and_sync, adapter_name), {})
                  for rank in model._ranks]
    sampler_refs = [sampler._actor(rank).apply.remote(sampler._handle, _sampler_side, (spec, 1 + index), {})
                    for index, rank in enumerate(sampler._ranks)]
    sent = model._wait('sync_weights (model side)', model_refs)
    sampler._wait('sync_weights (sampler side)', sampler_refs)
    return sent[0]


def _endpoint_on_first_rank(model):
    return free_endpoint() if model.device_mesh is None or model.device_mesh.rank == 0 else None


def _engine(spec: Dict[str, Any], rank: int):
    from twinkle import backends
    from twinkle.checkpoint_engine import ProcessGroupCheckpointEngine
    from twinkle.utils.process_state import process_state
    engines = process_state().cache(_ENGINES)
    if spec['key'] not in engines:
        device = backends.current()
        engines[spec['key']] = ProcessGroupCheckpointEngine(
            rank=rank, world_size=spec['world_size'], host=spec['host'], port=spec['port'],
            backend=device.dist_backend, device=device.local_device(), timeout=spec['timeout'])
    return engines[spec['key']]


def _model_side(model, spec: Dict[str, Any], merge_and_sync: bool, adapter_name: Optional[str]):
    from twinkle.checkpoint_engine import CheckpointEngineManager
    first = model.device_mesh is None or model.device_mesh.rank == 0
    manager = CheckpointEngineManager(model=model, engine=_engine(spec, 0) if first else None,
                                      adapter_name=adapter_name)
    return manager.sync_weights(merge_and_sync=merge_and_sync)


def _sampler_side(sampler, spec: Dict[str, Any], sync_rank: int):
    from twinkle.checkpoint_engine import CheckpointEngineManager
    return CheckpointEngineManager(sampler=sampler, engine=_engine(spec, sync_rank)).sync_weights()
