"""RMSNorm on CPU through the C++ kernels of csrc/rms_norm.cpp (vectorised, parallel over rows).

The kernels are torch ops (``twinkle_cpu::rms_norm_forward`` / ``_backward``); their fake kernels
and autograd are registered here, so torch.compile traces them as single nodes, no graph break.
Forward returns the per-row rstd (fp32, fp64 for fp64 input) so backward skips the reduction.
"""
import torch

from .. import native
from .autograd import differentiate

native.require()
_ops = torch.ops.twinkle_cpu


@torch.library.register_fake('twinkle_cpu::rms_norm_forward')
def _rms_norm_forward_fake(x, weight, eps, offset):
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=math_dtype)


@torch.library.register_fake('twinkle_cpu::rms_norm_backward')
def _rms_norm_backward_fake(grad_y, x, weight, rstd, offset):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


differentiate('twinkle_cpu::rms_norm_forward', _ops.rms_norm_backward)


def rms_norm(x, weight, eps, offset):
    return _ops.rms_norm_forward(x, weight, eps, offset)[0]
