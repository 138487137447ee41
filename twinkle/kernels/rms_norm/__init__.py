"""RMSNorm: the pattern every op follows (public function -> checks -> registry -> backend)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from ..checks import require_same_device, require_size, require_tensor
from ..native import NATIVE_CPU
from ..registry import Impl

# Liger's RMSNorm kernel does not run in the Triton interpreter: GPUs only.
registry.register('rms_norm', ['reference', 'cpu', 'triton', 'liger', 'npu'], cpu=NATIVE_CPU,
                  liger=Impl('liger', devices=('cuda', 'npu'), packages=('liger_kernel',), extra='liger'))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             backend: Optional[str] = None) -> torch.Tensor:
    """Root-mean-square norm over the last dim: ``x * rsqrt(mean(x^2) + eps) * (weight + offset)``.

    ``offset=1.0`` is the Gemma / Qwen3.5 form whose weight is stored as ``weight - 1``.
    The math runs in fp32 whatever the dtypes; the result has ``x``'s dtype.
    ``backend`` forces an implementation (see ``twinkle.kernels.select('rms_norm')``).
    """
    require_tensor('x', x, floating=True, min_dims=1)
    require_tensor('weight', weight, floating=True, dims=(1,))
    require_size('weight', weight.shape[0], x.shape[-1], 'length equal to the last dim of x,')
    require_same_device('x', x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f'eps must be a number >= 0, got {eps!r}')
    return registry.resolve('rms_norm', backend, x.device)(x, weight, float(eps), float(offset))


from .module import TwinkleRMSNorm  # noqa: E402  (the module wraps the function above)

__all__ = ['rms_norm', 'TwinkleRMSNorm']
