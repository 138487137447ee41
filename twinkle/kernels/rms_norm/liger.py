"""RMSNorm through Liger-Kernel. Casting mode 'gemma' computes everything in fp32, which is the
semantics of twinkle's reference (Liger's default 'llama' mode rounds x_hat before the weight)."""
from liger_kernel.ops.rms_norm import LigerRMSNormFunction


def rms_norm(x, weight, eps, offset):
    return LigerRMSNormFunction.apply(x, weight, eps, offset, 'gemma', False)
