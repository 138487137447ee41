"""Parallelism applied to models from outside: the mesh, FSDP2/HSDP, gradients, collectives, checkpoints.

Typical torchrun script::

    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=4)
    twinkle.initialize(mode='local', global_device_mesh=mesh)
    model = parallelize(get_peft_model(model, lora_config), mesh)
"""
from .checkpoint import (checkpoint_directory, load_sharded, recover_checkpoint, rng_state, save_full_state_dict,
                         save_sharded, set_rng_state, write_full_state_dict, write_sharded)
from .collectives import CollectiveTimeout, all_reduce_sum, collective
from .context_parallel import context_parallel_attention, ulysses_kv_replicas
from .context_parallel_model import shard_batch
from .expert_checkpoint import full_expert_state_dict, shard_expert_state_dict
from .expert_parallel import (AllToAllTokenDispatcher, all_to_all_combine, all_to_all_dispatch, apply_expert_parallel,
                              count_dispatched_bytes)
from .fsdp import decoder_layers, parallelize
from .gradients import clip_grad_norm_, scale_gradients_
from .mesh import DeviceGroup, DeviceMesh, get_device_placement, global_mesh
from .sequence_shards import SequenceShards, sequence_lengths, shard_sequences

__all__ = ['AllToAllTokenDispatcher', 'CollectiveTimeout', 'DeviceGroup', 'DeviceMesh', 'SequenceShards',
           'all_reduce_sum', 'all_to_all_combine', 'all_to_all_dispatch', 'apply_expert_parallel',
           'checkpoint_directory', 'clip_grad_norm_', 'collective', 'context_parallel_attention',
           'count_dispatched_bytes', 'decoder_layers', 'full_expert_state_dict', 'get_device_placement',
           'global_mesh', 'load_sharded', 'parallelize', 'recover_checkpoint', 'rng_state', 'save_full_state_dict',
           'save_sharded', 'scale_gradients_', 'sequence_lengths', 'set_rng_state', 'shard_batch',
           'shard_expert_state_dict', 'shard_sequences', 'ulysses_kv_replicas', 'write_full_state_dict',
           'write_sharded']
