"""Input checks shared by the public ops, all of them here. They run once, before any backend, and
name the argument at fault so the error is the same whichever backend would have run. Shape,
dtype and device checks are free and always run; value checks (below) read the device."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch

from twinkle.utils.labels import IGNORE_INDEX


def require_tensor(name: str, value, *, floating: bool = False, dims: Optional[Sequence[int]] = None,
                   min_dims: int = 0) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f'{name} must be a torch.Tensor, got {type(value).__name__}')
    if floating and not value.is_floating_point():
        raise ValueError(f'{name} must be a floating-point tensor, got dtype {value.dtype}')
    if dims is not None and value.dim() not in dims:
        raise ValueError(f'{name} must have {" or ".join(map(str, dims))} dims, got shape {tuple(value.shape)}')
    if value.dim() < min_dims:
        raise ValueError(f'{name} must have at least {min_dims} dims, got shape {tuple(value.shape)}')
    return value


def require_integer(name: str, value: torch.Tensor) -> None:
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f'{name} must be an integer tensor, got dtype {value.dtype}')


def require_int(name: str, value, *, low: Optional[int] = None) -> None:
    """A Python int (not a bool), at least ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ValueError(f'{name} must be an int{f" >= {low}" if low is not None else ""}, got {value!r}')


def require_head_inputs(hidden: torch.Tensor, weight_name: str, weight: torch.Tensor, labels: torch.Tensor) -> None:
    """An LM head's loss inputs: hidden (..., H) floating, its weight (V, H) of hidden's dtype,
    integer labels of hidden's shape without H, all on one device."""
    require_tensor('hidden', hidden, floating=True, min_dims=1)
    require_tensor(weight_name, weight, floating=True, dims=(2,))
    require_size(weight_name, weight.shape[1], hidden.shape[-1], 'dim 1 (hidden size) equal to the last dim of hidden,')
    if weight.dtype != hidden.dtype:
        raise ValueError(f'{weight_name} must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}')
    require_tensor('labels', labels)
    require_integer('labels', labels)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f'labels must have the shape of hidden without its last dim, '
                         f'{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}')
    require_same_device('hidden', hidden, **{weight_name: weight}, labels=labels)


def require_same_device(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f'{name} is on {tensor.device} but {reference_name} is on {reference.device}')


def require_size(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f'{name}: expected {what} {expected}, got {actual}')


# -- value checks ---------------------------------------------------------------------------
# Reading a tensor's values waits for the device (a host sync). The public ops do not do it on
# every call: the values are checked once per batch where the batch is built (the model adapter,
# ``check_batch``), and at the op only with TWINKLE_CHECK_VALUES=1 (debugging; never traced).

CHECK_VALUES_ENV = 'TWINKLE_CHECK_VALUES'


def check_values() -> bool:
    """Whether the ops check tensor values (TWINKLE_CHECK_VALUES=1), never inside torch.compile."""
    return os.environ.get(CHECK_VALUES_ENV) == '1' and not torch.compiler.is_compiling()


def require_ids_in_range(name: str, ids: torch.Tensor, high: int, *, ignore: Optional[int] = None) -> None:
    """Every id in [0, high) (or equal to ``ignore``)."""
    if not ids.numel():
        return
    bad = (ids < 0) | (ids >= high)
    if ignore is not None:
        bad &= ids != ignore
    if bool(bad.any()):
        found = ids[bad].reshape(-1)[0].item()
        allowed = f' or equal {ignore}' if ignore is not None else ''
        raise ValueError(f'{name}: ids must be in [0, {high}){allowed}; found {found}')


def require_boundaries(name: str, cu_seq_lens: torch.Tensor, total: int) -> None:
    """Cumulative sequence lengths: from 0 to ``total`` without decreasing."""
    bounds = cu_seq_lens.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f'{name} must rise from 0 to the {total} tokens without decreasing, '
                         f'got {bounds[:8]}{"..." if len(bounds) > 8 else ""}')


def require_group_sizes(name: str, sizes: torch.Tensor, total: int, what: str) -> None:
    """Non-negative group sizes that add up to ``total``."""
    if sizes.numel() and int(sizes.min()) < 0:
        raise ValueError(f'{name} must not be negative')
    summed = int(sizes.sum())
    if summed != total:
        raise ValueError(f'{name} must sum to {what} ({total}), got {summed}')


def check_batch(batch: Dict[str, object], vocab_size: Optional[int] = None) -> None:
    """The value checks of a collated batch, once, before it reaches the model (where the ops no
    longer check per call): token ids and labels within the vocabulary, packed boundaries rising
    from 0 to the row's tokens, and ``max_length_q`` their longest sequence."""
    input_ids = batch.get('input_ids')
    if vocab_size is not None:
        if isinstance(input_ids, torch.Tensor):
            require_ids_in_range('input_ids', input_ids, vocab_size)
        labels = batch.get('labels')
        if isinstance(labels, torch.Tensor):
            require_ids_in_range('labels', labels, vocab_size, ignore=IGNORE_INDEX)
    for key in ('cu_seq_lens_q', 'cu_seq_lens_k'):
        bounds = batch.get(key)
        if not isinstance(bounds, torch.Tensor):
            continue
        total = input_ids.numel() if isinstance(input_ids, torch.Tensor) else int(bounds[-1])
        require_boundaries(key, bounds, total)
        longest = batch.get('max_length' + key[len('cu_seq_lens'):])
        actual = int(bounds.diff().max()) if bounds.numel() > 1 else 0
        if longest is not None and int(longest) < actual:
            raise ValueError(f'max_length{key[len("cu_seq_lens"):]}={longest} is shorter than the longest '
                             f'sequence of {key} ({actual})')
