"""RoPE in plain PyTorch: the oracle of the tests and the fallback on every device.

HF's rotate_half form, x * cos + rotate_half(x) * sin, on the first cos.shape[-1] dims of each
head (the rest pass through). fp32 math, rounded once; autograd differentiates q, k, cos and sin.
"""
import torch


def rope(q, k, cos, sin, unsqueeze_dim):
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
