"""Checkpoints in the formats the ecosystem loads: Hugging Face for full models, peft for adapters,
plus an optional ``trainer_state.pt`` (optimizer, schedule, RNG) for exact resumption."""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Dict, Optional

import torch
from torch import nn

from twinkle.utils.io import atomic_directory, recover
from twinkle.utils.logger import get_logger

logger = get_logger(__name__)

TRAINER_STATE = 'trainer_state.pt'


def adapter_dir(path: str, adapter: str) -> str:
    """peft writes the adapter named 'default' at the root and any other one in a subfolder."""
    return path if adapter == 'default' else os.path.join(path, adapter)


def save(model: nn.Module, path: str, *, adapter: Optional[str], tokenizer=None,
         trainer_state: Optional[dict] = None) -> None:
    with atomic_directory(path) as staging:
        if adapter is not None:
            model.save_pretrained(staging, selected_adapters=[adapter], save_embedding_layers=False)
        else:
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(staging, TRAINER_STATE))


def load(model: nn.Module, path: str, *, adapter: Optional[str], strict: bool = True,
         prepare: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]] = lambda weights: weights
         ) -> Optional[dict]:
    """Load weights into ``model`` in place; returns the trainer state if the checkpoint has one.
    ``prepare`` maps the weights as read (e.g. to this rank's expert slices) before they are set.

    Every tensor must be finite (a NaN or inf is a corrupt file, refused before it reaches the
    model) and, unless ``strict=False``, the checkpoint must cover exactly the model's (adapter's)
    weights: a partial load would leave the rest at their initial values. ``strict=False`` loads
    what matches and logs what was left out."""
    recover(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f'no checkpoint directory at {path}')
    if adapter is not None:
        from peft.utils import set_peft_model_state_dict
        _check_same_targets(model, path, adapter)
        weights = prepare(_read(os.path.join(adapter_dir(path, adapter), 'adapter_model.safetensors')))
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
        marker = f'.{adapter}.'
        missing = [key for key in result.missing_keys if marker in key]
    else:
        weights = {}
        for shard in sorted(glob.glob(os.path.join(path, '*.safetensors'))):
            weights.update(_read(shard))
        if not weights:
            raise FileNotFoundError(f'no *.safetensors weights in {path}')
        result = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, '_tied_weights_keys', None) or ())
        missing = [key for key in result.missing_keys if key not in tied]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        what = f'{adapter!r} adapter' if adapter is not None else 'model'
        detail = (f'{len(missing)} weights of the {what} are not in it {missing[:5]}, '
                  f'{len(unexpected)} weights in it the {what} lacks {unexpected[:5]}')
        if strict:
            raise ValueError(f'{path} does not match the {what}: {detail}. Load a checkpoint of this {what}, '
                             f'or pass strict=False to load the matching weights only')
        logger.warning('%s: partial load (strict=False): %s', path, detail)
    state_file = os.path.join(path, TRAINER_STATE)
    return torch.load(state_file, weights_only=False) if os.path.exists(state_file) else None


def _read(file: str) -> Dict[str, torch.Tensor]:
    """The tensors of one safetensors file, refused whole when it is damaged or holds NaN/inf.

    Finiteness is checked rather than a checksum: it catches the corruption that silently ruins
    training, costs one pass over the tensors at load, and works for files written by any tool
    (Hugging Face and peft checkpoints carry no checksum)."""
    from safetensors.torch import load_file
    if not os.path.isfile(file):
        raise FileNotFoundError(f'{file} does not exist: not a checkpoint of this kind '
                                f'(an adapter checkpoint has adapter_model.safetensors)')
    try:
        tensors = load_file(file)
    except Exception as error:  # safetensors raises its own error types, without the path
        raise ValueError(f'{file} is not a readable safetensors file (truncated or corrupt?): {error}') from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f'{file}: tensor {name!r} holds {bad} NaN/inf values of {tensor.numel()}: '
                             f'the file is corrupt (or was saved from a diverged run)')
    return tensors


def _check_same_targets(model: nn.Module, path: str, adapter: str) -> None:
    """An adapter saved for other modules cannot resume into this one; say which modules differ."""
    config_file = os.path.join(adapter_dir(path, adapter), 'adapter_config.json')
    config = getattr(model, 'peft_config', {}).get(adapter)
    if config is None or not os.path.isfile(config_file):
        return
    with open(config_file) as handle:
        saved = json.load(handle)
    for key in ('target_modules', 'target_parameters'):
        ours, theirs = _as_set(getattr(config, key, None)), _as_set(saved.get(key))
        if ours != theirs:
            raise ValueError(f'{path}: adapter {adapter!r} was saved with {key}={sorted(theirs)}, this one has '
                             f'{sorted(ours)} (only saved: {sorted(theirs - ours)}, only here: {sorted(ours - theirs)}); '
                             f'add the adapter with the saved LoraConfig to load it')


def _as_set(value) -> set:
    if value is None:
        return set()
    return {value} if isinstance(value, str) else set(value)
