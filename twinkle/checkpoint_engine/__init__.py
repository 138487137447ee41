"""Weight synchronisation from a training model to a sampler (the RL loop's "sync_weights").

``CheckpointEngineManager(model=, sampler=)`` streams the trained weights -- the LoRA adapter
only, or the adapter merged into the base weights -- to the sampler in buckets, so no rank ever
holds a second copy of the whole model. The transport is a ``CheckpointEngine``: in-process when
model and sampler live in one process, a standalone process group (gloo on CPU, NCCL/HCCL on
accelerators) when they are separate processes or separate worlds (torchrun roles, Ray groups).
"""
from .base import CheckpointEngine, InProcessCheckpointEngine, SyncTimeout, WeightBatch
from .manager import CheckpointEngineManager
from .process_group import ProcessGroupCheckpointEngine
from .weights import model_weights

__all__ = ['CheckpointEngine', 'CheckpointEngineManager', 'InProcessCheckpointEngine', 'ProcessGroupCheckpointEngine',
           'SyncTimeout', 'WeightBatch', 'model_weights']
