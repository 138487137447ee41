"""Input checks shared by the public ops. They run once, before any backend, and name the
argument at fault so the error is the same whichever backend would have run."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


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


def require_same_device(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f'{name} is on {tensor.device} but {reference_name} is on {reference.device}')


def require_size(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f'{name}: expected {what} {expected}, got {actual}')
