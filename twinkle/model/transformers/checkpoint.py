"""Checkpoints in the formats the ecosystem loads: Hugging Face for full models, peft for adapters,
plus an optional ``trainer_state.pt`` (optimizer, schedule, RNG) for exact resumption."""
from __future__ import annotations

import glob
import os
from typing import Callable, Dict, Optional

import torch
from torch import nn

from twinkle.utils.io import atomic_directory, recover

TRAINER_STATE = 'trainer_state.pt'


def adapter_dir(path: str, adapter: str) -> str:
    """peft writes the adapter named 'default' at the root and any other one in a subfolder."""
    return path if adapter == 'default' else os.path.join(path, adapter)


def save(model: nn.Module, path: str, *, adapter: Optional[str], tokenizer=None,
         trainer_state: Optional[dict] = None) -> None:
    with atomic_directory(path) as staging:
        if adapter is not None:
            model.save_pretrained(staging, selected_adapters=[adapter])
        else:
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(staging, TRAINER_STATE))


def load(model: nn.Module, path: str, *, adapter: Optional[str],
         prepare: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]] = lambda weights: weights
         ) -> Optional[dict]:
    """Load weights into ``model`` in place; returns the trainer state if the checkpoint has one.
    ``prepare`` maps the weights as read (e.g. to this rank's expert slices) before they are set."""
    from safetensors.torch import load_file
    recover(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f'no checkpoint directory at {path}')
    if adapter is not None:
        from peft.utils import set_peft_model_state_dict
        weights = prepare(load_file(os.path.join(adapter_dir(path, adapter), 'adapter_model.safetensors')))
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
        if result.unexpected_keys:
            raise ValueError(f'{path}: weights that adapter {adapter!r} does not have: {result.unexpected_keys[:5]}')
    else:
        weights = {}
        for shard in sorted(glob.glob(os.path.join(path, '*.safetensors'))):
            weights.update(load_file(shard))
        if not weights:
            raise FileNotFoundError(f'no *.safetensors weights in {path}')
        result = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, '_tied_weights_keys', None) or ())
        missing = [key for key in result.missing_keys if key not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(f'{path} does not match the model: missing {missing[:5]}, '
                             f'unexpected {result.unexpected_keys[:5]}')
    state_file = os.path.join(path, TRAINER_STATE)
    return torch.load(state_file, weights_only=False) if os.path.exists(state_file) else None
