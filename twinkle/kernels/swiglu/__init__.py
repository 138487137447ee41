"""SwiGLU, the gated activation of Llama/Qwen MLPs: ``silu(gate) * up``."""
from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from ..checks import require_same_device, require_tensor
from ..native import NATIVE_CPU
from ..registry import Impl

# Like its RMSNorm, Liger's SwiGLU kernel does not run in the Triton interpreter: GPUs only.
registry.register('swiglu', ['reference', 'cpu', 'triton', 'liger', 'npu'], cpu=NATIVE_CPU,
                  liger=Impl('liger', devices=('cuda', 'npu'), packages=('liger_kernel', 'triton'), extra='liger',
                             check=registry.triton_check))


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``silu(gate) * up`` elementwise, differentiable in both inputs.

    ``gate`` and ``up`` share shape, dtype and device; the result has their dtype. The fast
    backends save only the inputs and recompute ``silu`` in backward (no activation is kept).
    ``backend`` forces an implementation (see ``twinkle.kernels.select('swiglu')``).
    """
    require_tensor('gate', gate, floating=True, min_dims=1)
    require_tensor('up', up, floating=True)
    if up.shape != gate.shape:
        raise ValueError(f'up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}')
    if up.dtype != gate.dtype:
        raise ValueError(f'up must have the dtype of gate ({gate.dtype}), got {up.dtype}')
    require_same_device('gate', gate, up=up)
    return registry.resolve('swiglu', backend, gate.device)(gate, up)


from .module import TwinkleSwiGLUMLP  # noqa: E402  (the module wraps the function above)

__all__ = ['swiglu', 'TwinkleSwiGLUMLP']
