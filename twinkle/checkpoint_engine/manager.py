"""``CheckpointEngineManager``: the seeds' one call that puts the trained weights into the sampler."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch.distributed as dist

from twinkle.utils.logger import get_logger

from .base import CheckpointEngine, InProcessCheckpointEngine
from .weights import model_weights

logger = get_logger(__name__)


class CheckpointEngineManager:
    """Syncs ``model``'s weights into ``sampler``.

    Both given (one process): handed over in-process. Separate processes: each passes the side it
    holds (``model=`` on the model's ranks, ``sampler=`` on the samplers') and the same kind of
    ``engine`` (``ProcessGroupCheckpointEngine``: the model's first rank sends, every sampler
    receives; the model's other ranks take part in gathering FSDP shards only and need no engine).
    ``adapter_name``: which adapter to sync (default: the model's only one; none: the full model)."""

    def __init__(self, model=None, sampler=None, engine: Optional[CheckpointEngine] = None,
                 adapter_name: Optional[str] = None):
        if model is None and sampler is None:
            raise ValueError('CheckpointEngineManager needs model= or sampler= (or both)')
        self.model, self.sampler = model, sampler
        self.remote = getattr(model, 'is_remote_proxy', False) or getattr(sampler, 'is_remote_proxy', False)
        if self.remote:  # Ray mode: the groups' ranks sync among themselves (twinkle.infra.ray_weights)
            if not (getattr(model, 'is_remote_proxy', False) and getattr(sampler, 'is_remote_proxy', False)):
                raise ValueError('CheckpointEngineManager: in Ray mode pass both model= and sampler= as components '
                                 'built with remote_group=')
            self.engine, self.adapter_name = engine, adapter_name
            return
        helper = sampler is None and not self._first_model_rank()  # helps gather shards, sends nothing
        if engine is None and (model is None or sampler is None) and not helper:
            raise ValueError('CheckpointEngineManager: with only one of model= / sampler= in this process, pass '
                             'engine= (e.g. ProcessGroupCheckpointEngine) to reach the other')
        self.engine = engine if engine is not None or helper else InProcessCheckpointEngine()
        self.adapter_name = adapter_name

    def sync_weights(self, merge_and_sync: bool = False, adapter_name: Optional[str] = None) -> Dict[str, Any]:
        """Stream the weights (the adapter only, or merged into the base with ``merge_and_sync=True``)
        to the sampler; returns what was synced (kind, tensors, bytes, seconds) on this process."""
        if not isinstance(merge_and_sync, bool):
            raise ValueError(f'merge_and_sync must be True or False, got {merge_and_sync!r}')
        if self.remote:
            return self.model.sync_weights_into(self.sampler, merge_and_sync, adapter_name or self.adapter_name)
        started = time.perf_counter()
        summary: Dict[str, Any] = {}
        if self.model is not None:
            meta, weights = model_weights(self.model, self._adapter(adapter_name), merge=merge_and_sync)
            weights = _counted(weights, summary)
            if self._sends():
                self.engine.send(meta, weights)
            else:  # another model rank sends: this one only helps gather the FSDP shards
                for _ in weights:
                    pass
            summary['kind'] = meta['kind']
        if self.sampler is not None:
            batch = self.engine.receive()
            weights = _counted(batch.weights, summary) if self.model is None else batch.weights
            _deliver(self.sampler, batch.meta, weights)
            summary['kind'] = batch.meta['kind']
        summary['seconds'] = time.perf_counter() - started
        logger.info('sync_weights: %s, %d tensors, %.1f MiB in %.2f s', summary['kind'], summary.get('tensors', 0),
                    summary.get('bytes', 0) / 2**20, summary['seconds'])
        return summary

    def _adapter(self, adapter_name: Optional[str]) -> Optional[str]:
        name = adapter_name or self.adapter_name
        if name is not None:
            return name
        adapters = sorted(getattr(getattr(self.model, 'model', self.model), 'peft_config', {}) or {})
        if len(adapters) > 1:
            raise ValueError(f'sync_weights: the model has adapters {adapters}; pass adapter_name= to pick one')
        return adapters[0] if adapters else None

    def _sends(self) -> bool:
        if not self._first_model_rank():
            return False
        if not self.engine.is_sender:
            raise ValueError('CheckpointEngineManager: model= is given on a process whose engine receives '
                             '(rank 0 of the sync group must be the model)')
        return True

    def _first_model_rank(self) -> bool:
        mesh = getattr(self.model, 'device_mesh', None)
        return mesh is None or not dist.is_initialized() or mesh.rank == 0


def _counted(weights, summary: Dict[str, Any]):
    summary.setdefault('tensors', 0)
    summary.setdefault('bytes', 0)
    for name, tensor in weights:
        summary['tensors'] += 1
        summary['bytes'] += tensor.numel() * tensor.element_size()
        yield name, tensor


def _deliver(sampler, meta: Dict[str, Any], weights) -> None:
    if meta['kind'] == 'adapter':
        sampler.load_weights(weights, adapter_name=meta['adapter_name'], peft_config=meta['peft_config'])
    else:
        sampler.load_weights(weights)
