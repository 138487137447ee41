"""SwiGLU on CPU through the C++ kernels of csrc/swiglu.cpp (vectorised, parallel).

Torch ops with fake kernels and autograd registered here (torch.compile-clean). Only gate and up
are saved; backward recomputes sigmoid(gate), so no activation stays alive between the passes.
"""
import torch

from .. import native

native.require()
_ops = torch.ops.twinkle_cpu


@torch.library.register_fake('twinkle_cpu::swiglu_forward')
def _swiglu_forward_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake('twinkle_cpu::swiglu_backward')
def _swiglu_backward_fake(grad_y, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    gate, up = ctx.saved_tensors
    return _ops.swiglu_backward(grad_y, gate, up)


torch.library.register_autograd('twinkle_cpu::swiglu_forward', _backward, setup_context=_setup_context)


def swiglu(gate, up):
    return _ops.swiglu_forward(gate, up)
