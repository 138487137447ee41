"""SwiGLU in plain PyTorch: the oracle of the tests and the fallback on every device.

Computed in fp32 and rounded once to the input dtype; autograd derives the backward.
"""
import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
