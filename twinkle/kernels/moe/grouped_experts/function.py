"""The grouped SwiGLU experts as autograd Functions shared by the fast backends; each backend only
supplies its grouped GEMM (a ``GroupedGemm``: BLAS per expert, ``torch._grouped_mm``, Triton,
``npu_grouped_matmul``).

Autograd sees three nodes, so that it frees each one's saved tensors and incoming gradient as soon
as that node's backward is done (one Function for everything would hold the expert output's
gradient until the end, 128 MiB more at the benchmark shape):
- ``GroupedGateUp``: x -> (gate, up), per group, into two contiguous (rows, I) buffers; saves x.
  Backward: dW_gate_up = [dgate; dup]^T x, dx = dgate W_gate + dup W_up (no concatenation).
- ``swiglu(gate, up)``: twinkle's op (fused where the device has a kernel).
- ``GroupedDown``: h -> h W_down^T per group; saves h. Backward: dh = dy W_down, dW_down = dy^T h.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from ...swiglu import swiglu


class GroupedGemm(Protocol):
    """Matrix products over row groups: group e is the ``tokens_per_expert[e]`` rows after those
    of the groups before it. ``out`` may be given (written, or added to with ``accumulate``)."""

    def groups(self, tokens_per_expert: torch.Tensor) -> Any:
        """What ``rows`` and ``per_group`` need to find the groups (offsets, spans, ...)."""

    def rows(self, a: torch.Tensor, b: torch.Tensor, groups: Any, out: Optional[torch.Tensor] = None,
             accumulate: bool = False) -> torch.Tensor:
        """(rows, K) x (E, K, N) -> (rows, N): each group's rows times its expert's matrix."""

    def per_group(self, a: torch.Tensor, b: torch.Tensor, groups: Any,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(rows, M) x (rows, N) -> (E, M, N): a_e^T b_e per group (zeros for an empty group)."""


class GroupedGateUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted, gate_up_proj, gemm, groups):
        gate_proj, up_proj = gate_up_proj.chunk(2, dim=1)
        gate = gemm.rows(permuted, gate_proj.transpose(1, 2), groups)
        up = gemm.rows(permuted, up_proj.transpose(1, 2), groups)
        ctx.save_for_backward(permuted, gate_up_proj)
        ctx.gemm, ctx.groups = gemm, groups
        return gate, up

    @staticmethod
    def backward(ctx, grad_gate, grad_up):
        permuted, gate_up_proj = ctx.saved_tensors
        gemm, groups = ctx.gemm, ctx.groups
        grad_gate, grad_up = grad_gate.contiguous(), grad_up.contiguous()
        grad_input = grad_gate_up = None
        if ctx.needs_input_grad[1]:
            intermediate = grad_gate.shape[1]
            grad_gate_up = gate_up_proj.new_empty(gate_up_proj.shape)
            gemm.per_group(grad_gate, permuted, groups, out=grad_gate_up[:, :intermediate])
            gemm.per_group(grad_up, permuted, groups, out=grad_gate_up[:, intermediate:])
        if ctx.needs_input_grad[0]:
            gate_proj, up_proj = gate_up_proj.chunk(2, dim=1)
            grad_input = gemm.rows(grad_gate, gate_proj, groups)
            gemm.rows(grad_up, up_proj, groups, out=grad_input, accumulate=True)
        return grad_input, grad_gate_up, None, None


class GroupedDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, down_proj, gemm, groups):
        ctx.save_for_backward(hidden, down_proj)
        ctx.gemm, ctx.groups = gemm, groups
        return gemm.rows(hidden, down_proj.transpose(1, 2), groups)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, down_proj = ctx.saved_tensors
        gemm, groups = ctx.gemm, ctx.groups
        grad_out = grad_out.contiguous()
        grad_hidden = gemm.rows(grad_out, down_proj, groups) if ctx.needs_input_grad[0] else None
        grad_down = gemm.per_group(grad_out, hidden, groups) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_down, None, None


def into(result: torch.Tensor, out: Optional[torch.Tensor], accumulate: bool = False) -> torch.Tensor:
    """For GEMMs that return fresh tensors: ``result`` itself, or written / added into ``out``."""
    if out is None:
        return result
    return out.add_(result) if accumulate else out.copy_(result)


def grouped_swiglu_experts(gemm: GroupedGemm):
    """The op function of a backend whose grouped GEMM is ``gemm``."""
    def grouped_experts(permuted, tokens_per_expert, gate_up_proj, down_proj):
        groups = gemm.groups(tokens_per_expert)
        gate, up = GroupedGateUp.apply(permuted, gate_up_proj, gemm, groups)
        return GroupedDown.apply(swiglu(gate, up), down_proj, gemm, groups)
    return grouped_experts
