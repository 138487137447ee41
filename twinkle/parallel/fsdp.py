"""FSDP2 applied from outside the model: ``parallelize(model, mesh)``.

Each decoder layer becomes one FSDP unit (its parameters are gathered just before it runs and
freed after), then the root takes what is left (embeddings, final norm, head). The mesh decides
the flavour: fsdp > 1 shards over fsdp; dp > 1 as well gives HSDP (shard within an fsdp group,
replicate across dp); dp alone replicates. Gradients come out SUMMED over data ranks (see
``twinkle.parallel.gradients`` for the token normalisation that follows).

Context-parallel ranks (cp, ulysses) hold other tokens of the same rows: they shard the parameters
too (fsdp x cp x ulysses), so their gradients sum over every token of the batch.

With expert parallelism (ep > 1, ``apply_expert_parallel`` done first) the ep ranks are data ranks
too. Non-expert parameters are the same everywhere and shard over all data ranks (fsdp x ep);
each rank's experts exist only on the ranks with the same ep index, so every expert unit (the
experts module with its peft wrappers) is its own FSDP unit sharded over fsdp alone, the
EP-complement. Its gradients then sum over those ranks, which together saw every token routed to
these experts (the dispatch's backward already brought them from the other ep ranks).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from twinkle import backends
from twinkle.utils.logger import get_logger

from .expert_parallel import expert_units, mark_expert_local
from .mesh import DeviceMesh

logger = get_logger(__name__)

_LATER = {'tp': 'Megatron (MegatronModel)', 'pp': 'Megatron (MegatronModel)'}
_DTYPES = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16,
           'fp32': torch.float32, 'float32': torch.float32}


def parallelize(model: nn.Module, mesh: DeviceMesh, *, mixed_precision: Union[None, str, torch.dtype] = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` over the data dims of ``mesh`` with FSDP2 (in place); returns the model.

    Apply adapters (peft LoRA) before this. ``mixed_precision``: None keeps the stored dtype; a dtype
    or 'bf16'/'fp16' computes in it and reduces gradients in fp32; 'auto' asks the device layer.
    ``reshard_after_forward=False`` keeps gathered layers until backward (faster, more memory).
    """
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f'mesh must be a twinkle DeviceMesh, got {type(mesh).__name__}')
    for dim, feature in _LATER.items():
        if mesh.size(dim) > 1:
            raise NotImplementedError(f'{dim}_size={mesh.size(dim)}: parallelize handles dp, fsdp, ep, cp and '
                                      f'ulysses only; '
                                      f'{feature} is not available here yet')
    param_dtype = _param_dtype(mixed_precision)
    units = [(unit, experts.ep_group) for _, unit, experts in expert_units(model)]
    if mesh.size('ep') > 1 and not units:
        raise ValueError(f'mesh has ep_size={mesh.size("ep")} but the model has no expert-parallel experts: '
                         f'call apply_expert_parallel(model, mesh) before parallelize')
    if mesh.loss_world_size == 1:
        logger.info('parallelize: one data rank, model left unsharded')
        return model
    if not dist.is_initialized():
        raise RuntimeError(f'mesh {mesh.describe_sizes()} needs a process group: launch with torchrun '
                           f'and call twinkle.initialize(global_device_mesh=mesh) first')
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # slow import: on use

    policy = (MixedPrecisionPolicy() if param_dtype is None
              else MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))
    if units:
        expert_mesh = mesh.expert_mesh()
        for unit, group in units:
            fully_shard(unit, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
            mark_expert_local(unit, group)
    shard_mesh = mesh.fsdp_mesh()
    layers = decoder_layers(model)
    layer_class = type(layers[0]).__name__
    for layer in layers:
        fully_shard(layer, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # plain sums: the token normalisation divides later
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    sharded = ' x '.join(dim for dim in ('fsdp', 'ep', 'cp', 'ulysses') if mesh.size(dim) > 1)
    flavour = ', '.join(part for part in ('replicate over dp' if mesh.size('dp') > 1 else '',
                                          f'shard over {sharded}' if sharded else '') if part)
    if mesh.size('dp') > 1 and sharded:
        flavour = f'HSDP: {flavour}'
    if units:
        flavour += (f'; {len(units)} expert units over the EP-complement (fsdp x cp x ulysses = '
                    f'{mesh.size("fsdp") * mesh.sequence_world_size})')
    logger.info('parallelize: FSDP2 over %s (%s), %d x %s + root, compute dtype %s', mesh.describe_sizes(),
                flavour, len(layers), layer_class, param_dtype or 'as stored')
    return model


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks to shard one by one: instances of the classes a Hugging Face model lists
    in ``_no_split_modules`` (found through peft wrappers), else the longest ``nn.ModuleList``."""
    block_names = set()
    for module in model.modules():
        block_names.update(getattr(module, '_no_split_modules', None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if blocks:
        return blocks
    module_lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module)]
    if not module_lists:
        raise ValueError(f'model ({type(model).__name__}) has no decoder layers to shard: '
                         f'no _no_split_modules and no nn.ModuleList')
    return list(max(module_lists, key=len))


def _param_dtype(mixed_precision: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """The compute dtype of the FSDP policy; None when it would change nothing (fp32 or unset)."""
    if mixed_precision == 'auto':
        dtype = backends.current().default_dtype()
        logger.info('parallelize: mixed_precision=auto -> %s (device default)', dtype)
    elif isinstance(mixed_precision, str) and mixed_precision in _DTYPES:
        dtype = _DTYPES[mixed_precision]
    elif mixed_precision is None or isinstance(mixed_precision, torch.dtype):
        dtype = mixed_precision
    else:
        raise ValueError(f'mixed_precision must be None, a torch dtype, "auto" or one of '
                         f'{", ".join(_DTYPES)}; got {mixed_precision!r}')
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f'mixed_precision must be a floating dtype, got {dtype}')
    return None if dtype == torch.float32 else dtype
