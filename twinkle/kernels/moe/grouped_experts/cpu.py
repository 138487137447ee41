"""Grouped SwiGLU experts on CPU: one BLAS GEMM per expert on its contiguous slice of rows,
written in place into the output (no gather, no copy, no zero-fill of activations).

On CPU ``torch._grouped_mm`` is itself a loop of GEMMs, so this runs the same GEMMs; what it
saves is everything around them (see function.py). Each op reads the group bounds of its CPU
tensor ``tokens_per_expert`` (host memory: no device to wait for).
"""
import torch

from .function import define_grouped_experts


class PerExpertGemm:
    @staticmethod
    def groups(tokens_per_expert, rows):
        ends = torch.cumsum(tokens_per_expert, 0).tolist()
        return list(zip([0] + ends[:-1], ends))

    @staticmethod
    def rows(a, b, groups, out=None, accumulate=False):
        if out is None:
            out = a.new_empty(a.shape[0], b.shape[2])
        for expert, (start, end) in enumerate(groups):
            if start == end:
                continue
            if accumulate:
                out[start:end].addmm_(a[start:end], b[expert])
            else:
                torch.mm(a[start:end], b[expert], out=out[start:end])
        return out

    @staticmethod
    def per_group(a, b, groups, out=None):
        if out is None:
            out = a.new_empty(len(groups), a.shape[1], b.shape[1])
        for expert, (start, end) in enumerate(groups):
            if start == end:
                out[expert].zero_()
            else:
                torch.mm(a[start:end].t(), b[start:end], out=out[expert])
        return out


grouped_experts = define_grouped_experts('twinkle_cpu', PerExpertGemm())
