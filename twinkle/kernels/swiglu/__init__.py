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


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, inplace: bool = False,
           backend: Optional[str] = None) -> torch.Tensor:
    """``silu(gate) * up`` elementwise, differentiable in both inputs.

    ``gate`` and ``up`` share shape, dtype and device; the result has their dtype. The fast
    backends save only the inputs and recompute ``silu`` in backward (no activation is kept).
    ``inplace=True`` lets backward write the gradients over ``gate`` and ``up`` (two activations
    fewer in memory) where the backend has that path (cpu); pass it only for inputs that nothing
    reads after this call, as an MLP's projections (``TwinkleSwiGLUMLP`` does). They must be
    separate, contiguous results of autograd-tracked ops, never leaves or partial views.
    ``backend`` forces an implementation (see ``twinkle.kernels.select('swiglu')``).
    """
    require_tensor('gate', gate, floating=True, min_dims=1)
    require_tensor('up', up, floating=True)
    if up.shape != gate.shape:
        raise ValueError(f'up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}')
    if up.dtype != gate.dtype:
        raise ValueError(f'up must have the dtype of gate ({gate.dtype}), got {up.dtype}')
    require_same_device('gate', gate, up=up)
    if inplace:
        for name, tensor in (('gate', gate), ('up', up)):
            why = overwrite_refusal(tensor)
            if why:
                raise ValueError(f'inplace=True writes the gradient over {name} during backward, but {name} {why}; '
                                 f'pass inplace=False')
    return registry.resolve('swiglu', backend, gate.device, 'inplace' if inplace else None)(gate, up)


def overwrite_refusal(tensor: torch.Tensor) -> Optional[str]:
    """Why backward may not write over ``tensor`` (None when it may): a leaf is a parameter or an input
    someone holds, a partial view shares memory with the rest of its base, and a non-contiguous tensor
    cannot take a flat gradient. (nn.Linear with a bias returns a whole view of its GEMM's output.)"""
    if not tensor.requires_grad:
        return 'does not require grad (nothing to write)'
    if tensor.is_leaf:
        return 'is a leaf tensor (a parameter or an input the caller holds)'
    base = tensor._base
    if base is not None and (base.is_leaf or base.numel() != tensor.numel()):
        return 'is a view of part of another tensor, or of a leaf'  # a whole-reshape of a result is fine
    if not tensor.is_contiguous():
        return 'is not contiguous'
    return None


from .module import TwinkleSwiGLUMLP  # noqa: E402  (the module wraps the function above)

__all__ = ['swiglu', 'TwinkleSwiGLUMLP']
