"""Checkpoints of (possibly sharded) models, in two kinds.

- Full, for people and other tools: ``save_full_state_dict`` gathers the weights to rank 0, which
  writes Hugging Face format (or peft adapter format for a PeftModel: adapter weights only). Load it
  with ``from_pretrained`` on any number of ranks, then ``parallelize``.
- Sharded, for exact resume: ``save_sharded`` / ``load_sharded`` use torch.distributed.checkpoint,
  each rank writing its own shards of the model and optimizer (DCP reshards on load if the world
  size changed), plus a per-rank ``extra_state`` dict (scheduler, dataloader, ``rng_state()``).

A checkpoint is one atomic unit at any world size: every part (full weights, sharded state) is
written into one staging directory next to ``path``, which rank 0 commits once every rank has
finished (``checkpoint_directory``), so ``path`` always holds a whole checkpoint, the previous or the
new one. Every rank must call these functions (they are collective).
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from twinkle import backends
from twinkle.utils.io import atomic_directory, recover
from twinkle.utils.logger import get_logger

from .collectives import collective
from .expert_checkpoint import expert_local_keys, full_expert_state_dict

logger = get_logger(__name__)

_EXTRA_STATE = 'extra_state.rank{rank}.pt'


def save_full_state_dict(model: nn.Module, path: str, *, safe_serialization: bool = True) -> None:
    """Gather the full weights (CPU, rank 0) and write them with the model's ``save_pretrained``.

    A peft model saves its trainable (adapter) weights only; frozen base weights are not gathered.
    """
    with checkpoint_directory(path) as staging:
        write_full_state_dict(model, staging, safe_serialization=safe_serialization)


def write_full_state_dict(model: nn.Module, directory: str, *, safe_serialization: bool = True) -> None:
    """``save_full_state_dict`` into an existing (staging) ``directory``, without committing it;
    for a checkpoint made of several parts (``checkpoint_directory``). Collective."""
    if not hasattr(model, 'save_pretrained'):
        raise ValueError(f'model ({type(model).__name__}) has no save_pretrained: not a Hugging Face or peft model')
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    is_peft = hasattr(model, 'peft_config')
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_peft)
    with collective('save_full_state_dict'):
        state_dict = get_model_state_dict(model, options=options)
        experts = full_expert_state_dict(model, trainable_only=is_peft)  # EP slices -> all experts
        if _rank() == 0:
            state_dict.update(experts)
            tensors = len(state_dict)  # save_pretrained may empty the dict
            # peft would otherwise add the (frozen, tied) embedding matrix when LoRA targets lm_head
            extra = {'save_embedding_layers': False} if is_peft else {}
            model.save_pretrained(directory, state_dict=state_dict, safe_serialization=safe_serialization, **extra)
            logger.info('wrote %s weights (%d tensors)', 'adapter' if is_peft else 'full', tensors)
        _barrier()


def save_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 extra_state: Optional[Dict[str, Any]] = None) -> None:
    """Write this rank's model and optimizer shards and its ``extra_state`` (any picklable dict)."""
    with checkpoint_directory(path) as staging:
        write_sharded(staging, model, optimizer, extra_state)


def write_sharded(directory: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                  extra_state: Optional[Dict[str, Any]] = None) -> None:
    """``save_sharded`` into ``directory`` (created if missing) inside a ``checkpoint_directory``,
    without committing it. Collective."""
    from torch.distributed.checkpoint import save
    with collective('save_sharded'):
        if _rank() == 0:
            os.makedirs(directory, exist_ok=True)
        _barrier()
        save(_training_state(model, optimizer), checkpoint_id=directory)
        torch.save(extra_state or {}, os.path.join(directory, _EXTRA_STATE.format(rank=_rank())))
    logger.info('wrote sharded state (%d ranks)', _world_size())


@contextlib.contextmanager
def checkpoint_directory(path: str) -> Iterator[str]:
    """One checkpoint, however many parts and ranks write it: rank 0 opens a staging directory
    next to ``path`` (``twinkle.utils.io.atomic_directory``) and shares its name, every rank writes
    its parts into it, and once all have finished rank 0 commits it to ``path`` in one atomic step.
    A crash anywhere inside leaves the previous checkpoint at ``path`` whole. Collective."""
    with collective('checkpoint_directory'):
        if _rank() == 0:
            with atomic_directory(path) as staging:
                _broadcast_from_rank0(staging)
                yield staging
                _barrier()  # every rank has written its part
        else:
            yield _broadcast_from_rank0(None)
            _barrier()
        _barrier()  # committed: every rank may read it now
    logger.info('saved checkpoint (%d ranks) to %s', _world_size(), path)


def recover_checkpoint(path: str) -> None:
    """Before reading ``path``: rank 0 undoes what an interrupted save left (restores the previous
    checkpoint if the save died between its two renames, see ``twinkle.utils.io``). Collective."""
    if _rank() == 0:
        recover(path)
    _barrier()


def load_sharded(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Load what ``save_sharded`` wrote into ``model`` (already parallelized) and ``optimizer``;
    returns this rank's ``extra_state`` (rank 0's when the checkpoint came from fewer ranks)."""
    recover_checkpoint(path)
    if not os.path.isdir(path):
        raise ValueError(f'path {path!r} is not a checkpoint directory')
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    with collective('load_sharded'):
        state = _training_state(model, optimizer)
        load(state, checkpoint_id=path)
        state = _renamed(state, {tagged: name for name, tagged in expert_local_keys(model).items()})
        set_model_state_dict(model, state['model'])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state['optimizer'])
    extra_file = os.path.join(path, _EXTRA_STATE.format(rank=_rank()))
    if not os.path.exists(extra_file):
        logger.info('no extra state for rank %d in %s (saved on fewer ranks): using rank 0\'s', _rank(), path)
        extra_file = os.path.join(path, _EXTRA_STATE.format(rank=0))
    return torch.load(extra_file, weights_only=False)  # our own file: it holds RNG states (numpy, python)


def rng_state() -> Dict[str, Any]:
    """Every RNG this process draws from (python, numpy, torch CPU, the accelerator), for resume."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    device_type = backends.current().torch_device_type
    if device_type != 'cpu':
        state[device_type] = torch.get_device_module(device_type).get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    device_type = backends.current().torch_device_type
    if device_type in state:
        torch.get_device_module(device_type).set_rng_state(state[device_type])


def _training_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    """This rank's sharded model (and optimizer) state, keyed by parameter names, as DCP wants it.

    DCP takes equal keys on different ranks for pieces of one tensor; expert-parallel slices are
    different tensors under one name, so they are stored under a key per EP rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {'model': get_model_state_dict(model)}
    if optimizer is not None:
        state['optimizer'] = get_optimizer_state_dict(model, optimizer)
    return _renamed(state, expert_local_keys(model))


def _renamed(state: Dict[str, Any], names: Dict[str, str]) -> Dict[str, Any]:
    """``state`` with the parameter names in ``names`` replaced (model keys, optimizer state keys
    and the optimizer's param-group lists)."""
    if not names:
        return state
    renamed = {'model': {names.get(key, key): value for key, value in state['model'].items()}}
    if 'optimizer' in state:
        optimizer = state['optimizer']
        groups = [{**group, 'params': [names.get(key, key) for key in group['params']]}
                  for group in optimizer['param_groups']]
        renamed['optimizer'] = {'state': {names.get(key, key): value for key, value in optimizer['state'].items()},
                                'param_groups': groups}
    return renamed


def _broadcast_from_rank0(value):
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
