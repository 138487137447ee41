"""SwiGLU in plain PyTorch: the oracle of the tests and the fallback on every device.

Computed in fp32 and rounded once to the input dtype. Registered as the op
``twinkle_ref::swiglu`` (autograd by recompute, see ``kernels/library.py``).
"""
import torch
import torch.nn.functional as F

from ..library import reference_op


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


swiglu = reference_op('swiglu', _swiglu)
