"""SwiGLU in Triton: elementwise over the flattened inputs, BLOCK elements per program.

Backward recomputes sigmoid(gate) from the saved inputs, so no activation is kept between the
passes. Loads are upcast to fp32 and results rounded once on store (the interpreter's bf16 math
is broken, and it keeps low-precision results as accurate as the reference). Forward and
backward are the torch ops ``twinkle_triton::swiglu_forward`` / ``_backward`` (fake kernels and
autograd registered here), so torch.compile keeps each one node.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

BLOCK = 1024     # elements per program: 8 per thread at 4 warps, enough for 16-byte accesses
NUM_WARPS = 4


@triton.jit
def _swiglu_forward_kernel(GATE, UP, OUT, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(DOUT, GATE, UP, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dout = tl.load(DOUT + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    # d silu(g) / dg = sig + g * sig * (1 - sig)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DGATE + offsets, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offsets, (dout * gate * sig).to(DUP.dtype.element_ty), mask=mask)


def _launch(kernel, n_elements: int, *tensors: torch.Tensor) -> None:
    """One program per BLOCK elements of the flat, contiguous ``tensors``."""
    if n_elements == 0:
        return
    block = min(BLOCK, triton.next_power_of_2(n_elements))
    kernel[(triton.cdiv(n_elements, block),)](*tensors, n_elements, BLOCK=block, num_warps=NUM_WARPS)


@torch.library.custom_op('twinkle_triton::swiglu_forward', mutates_args=())
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _launch(_swiglu_forward_kernel, gate.numel(), gate, up, out)
    return out


@swiglu_forward.register_fake
def _swiglu_forward_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op('twinkle_triton::swiglu_backward', mutates_args=())
def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)``, contiguous, from the saved inputs alone."""
    gate, up = gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    _launch(_swiglu_backward_kernel, gate.numel(), dout.contiguous(), gate, up, dgate, dup)
    return dgate, dup


@swiglu_backward.register_fake
def _swiglu_backward_fake(dout, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    return swiglu_backward(dout, *ctx.saved_tensors)


swiglu_forward.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate, up):
    return swiglu_forward(gate, up)
