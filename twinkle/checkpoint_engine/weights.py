"""The trained weights as a stream of (Hugging Face name, tensor), one tensor at a time.

FSDP-sharded parameters are gathered one by one (``full_tensor``: a collective over the model's
ranks, so every model rank must consume the stream, and only the sender keeps the result), never
the whole model at once. Names are what plain transformers / peft use, so a sampler of any kind
loads them by name.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

LORA_MARKERS = ('.lora_', '.lora_magnitude_vector')


def model_weights(model, adapter_name: Optional[str] = None, merge: bool = False
                  ) -> Tuple[Dict[str, Any], Iterator[Tuple[str, torch.Tensor]]]:
    """(meta, weights) of a twinkle model (or a bare HF / peft module).

    ``adapter_name`` None: the full model's weights. An adapter with ``merge=False``: its LoRA
    weights only, in peft's saved format (``meta['peft_config']`` says how to build it);
    ``merge=True``: the base weights with that adapter merged in (W + s·B·A), under the base model's
    names, for a sampler that holds no adapter."""
    module = getattr(model, 'model', model)
    if adapter_name is None:
        return {'kind': 'full'}, _plain(_base(module).named_parameters())
    peft_config = getattr(module, 'peft_config', {}).get(adapter_name)
    if peft_config is None:
        known = sorted(getattr(module, 'peft_config', {}))
        raise ValueError(f'adapter_name {adapter_name!r} is not an adapter of the model (it has {known or "none"})')
    if merge:
        return {'kind': 'merged', 'adapter_name': adapter_name}, _merged(module, adapter_name)
    meta = {'kind': 'adapter', 'adapter_name': adapter_name, 'peft_config': peft_config.to_dict()}
    return meta, _adapter(module, adapter_name)


def _base(module: nn.Module) -> nn.Module:
    get_base = getattr(module, 'get_base_model', None)
    return get_base() if get_base is not None else module


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, 'full_tensor', None)  # a DTensor (FSDP2 shard): gathered here
    return (full_tensor() if full_tensor is not None else tensor).detach()


def _plain(named) -> Iterator[Tuple[str, torch.Tensor]]:
    for name, parameter in named:
        yield name, _full(parameter)


def _adapter(module: nn.Module, adapter_name: str) -> Iterator[Tuple[str, torch.Tensor]]:
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(module, adapter_name=adapter_name, save_embedding_layers=False)
    for name in list(state):
        yield name, _full(state.pop(name))


def _merged(module: nn.Module, adapter_name: str) -> Iterator[Tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    base = _base(module)
    lora_modules = {name: sub for name, sub in base.named_modules() if isinstance(sub, BaseTunerLayer)}
    for name, parameter in base.named_parameters():
        if any(marker in name for marker in LORA_MARKERS):
            continue
        owner_name, marker, leaf = name.rpartition('.base_layer.')
        if not marker:
            yield name, _full(parameter)
            continue
        owner, hf_name = lora_modules.get(owner_name), f'{owner_name}.{leaf}'
        if owner is None or leaf != 'weight' or adapter_name not in getattr(owner, 'lora_A', {}):
            yield hf_name, _full(parameter)
            continue
        if not isinstance(owner, LoraLayer) or not hasattr(owner, 'fan_in_fan_out'):
            raise NotImplementedError(f'merge_and_sync: {type(owner).__name__} at {owner_name} is not a LoRA '
                                      f'linear; sync the adapter (merge_and_sync=False) instead')
        yield hf_name, _full(parameter) + _delta(owner, adapter_name)


def _delta(layer, adapter_name: str) -> torch.Tensor:
    """peft's delta weight (B·A, transposed for Conv1D-style layers, times the scaling), from the
    gathered factors, so that it is the same on FSDP shards as on one process."""
    delta = _full(layer.lora_B[adapter_name].weight) @ _full(layer.lora_A[adapter_name].weight)
    if layer.fan_in_fan_out:
        delta = delta.T
    return delta * layer.scaling[adapter_name]
