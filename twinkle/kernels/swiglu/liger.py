"""SwiGLU through Liger-Kernel's SiLU-mul kernels.

Liger's backward writes the gradients over the saved gate and up (its memory trick). That is
safe inside its own MLP, where nobody else holds those tensors, but not for a public function:
a caller's ``gate`` would be overwritten and a second backward (``retain_graph``) would read
gradients as activations. So this Function keeps the inputs and hands Liger private copies in
backward, at the cost of one extra read and write of gate and up.
"""
import torch
from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward


class LigerSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        _, _, out = swiglu_forward(gate, up)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return swiglu_backward(gate.clone(), up.clone(), dout.contiguous())


def swiglu(gate, up):
    return LigerSwiGLUFunction.apply(gate, up)
