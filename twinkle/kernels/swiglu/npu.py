"""SwiGLU on Ascend through ``torch_npu.npu_swiglu``, which torch_npu differentiates itself.

``npu_swiglu(x, dim)`` takes ONE tensor and splits it in half along ``dim``: silu(first half) *
second half. So gate and up are concatenated, gate first (one copy; a fused gate_up projection
would avoid it). The kernel rejects empty tensors, which take the reference path.
"""
import torch

from twinkle.backends.npu import torch_npu

from . import reference


def swiglu(gate, up):
    if gate.numel() == 0:
        return reference.swiglu(gate, up)
    return torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)
