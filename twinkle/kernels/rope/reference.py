"""RoPE in plain PyTorch: the oracle of the tests and the fallback on every device.

HF's rotate_half form, x * cos + rotate_half(x) * sin, on the first cos.shape[-1] dims of each
head (the rest pass through). fp32 math, rounded once. Registered as the op ``twinkle_ref::rope``
whose autograd (by recompute, see ``kernels/library.py``) differentiates q, k, cos and sin.
"""
from typing import Tuple

import torch

from ..library import reference_op


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          unsqueeze_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(unsqueeze_dim).float()
    sin = sin.unsqueeze(unsqueeze_dim).float()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    x32 = x.float()
    x_rot, x_pass = x32[..., :rotary_dim], x32[..., rotary_dim:]
    rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1).to(x.dtype)


rope = reference_op('rope', _rope)
