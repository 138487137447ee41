"""SwiGLU on CPU through the C++ kernels of csrc/swiglu.cpp (vectorised, parallel).

Torch ops with fake kernels and autograd registered here (torch.compile-clean). Only gate and up
are saved; backward recomputes sigmoid(gate), so no activation stays alive between the passes.
``swiglu_forward_donated`` is the same forward whose backward writes the two gradients over the
saved gate and up (``swiglu(..., inplace=True)``): two activation-sized tensors fewer to allocate
and fault in, for inputs nothing else reads after backward.
"""
import torch

from .. import native

native.require()
_ops = torch.ops.twinkle_cpu


@torch.library.register_fake('twinkle_cpu::swiglu_forward')
def _swiglu_forward_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake('twinkle_cpu::swiglu_forward_donated')
def _swiglu_forward_donated_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake('twinkle_cpu::swiglu_backward')
def _swiglu_backward_fake(grad_y, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@torch.library.register_fake('twinkle_cpu::swiglu_backward_')
def _swiglu_backward_inplace_fake(grad_y, gate, up):
    return None


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    gate, up = ctx.saved_tensors
    return _ops.swiglu_backward(grad_y, gate, up)


def _backward_donated(ctx, grad_y):
    gate, up = ctx.saved_tensors
    _ops.swiglu_backward_(grad_y, gate, up)
    # A C++ op's mutation bumps no version counter by itself: bumped here, a second backward
    # (retain_graph) fails on the modified saved tensors instead of reading gradients as inputs.
    torch.autograd.graph.increment_version((gate, up))
    return gate, up


torch.library.register_autograd('twinkle_cpu::swiglu_forward', _backward, setup_context=_setup_context)
torch.library.register_autograd('twinkle_cpu::swiglu_forward_donated', _backward_donated,
                                setup_context=_setup_context)


def swiglu(gate, up):
    return _ops.swiglu_forward(gate, up)


def swiglu_inplace(gate, up):
    return _ops.swiglu_forward_donated(gate, up)
