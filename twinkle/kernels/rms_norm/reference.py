"""RMSNorm in plain PyTorch: the oracle of the tests and the fallback on every device.

y = x / sqrt(mean(x^2) + eps) * (weight + offset), computed in fp32 and rounded once to x's dtype.
Registered as the op ``twinkle_ref::rms_norm`` (autograd by recompute, see ``kernels/library.py``).
"""
import torch

from ..library import reference_op


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * (weight.float() + offset)).to(x.dtype)


rms_norm = reference_op('rms_norm', _rms_norm)
