"""Grouped SwiGLU experts through ``torch._grouped_mm`` (CUTLASS on sm80+ GPUs, a GEMM loop on CPU).

The kernel wants 16-byte aligned strides, so the hidden and intermediate sizes must be multiples
of 16 bytes' worth of elements (4 in fp32, 8 in bf16/fp16); real models' are. It returns fresh
tensors, so writing into a slice of a gradient or adding to one costs a copy. Without rows the
kernel is skipped: it rejects the zero strides an empty gradient may come with.
"""
import torch

from .function import define_grouped_experts, into

ALIGNMENT_BYTES = 16


class TorchGroupedGemm:
    @staticmethod
    def groups(tokens_per_expert, rows):
        return torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)

    @staticmethod
    def rows(a, b, offsets, out=None, accumulate=False):
        result = torch._grouped_mm(a, b, offs=offsets) if a.shape[0] else a.new_empty(0, b.shape[2])
        return into(result, out, accumulate)

    @staticmethod
    def per_group(a, b, offsets, out=None):
        if a.shape[0]:
            result = torch._grouped_mm(a.t(), b, offs=offsets)
        else:
            result = a.new_zeros(offsets.shape[0], a.shape[1], b.shape[1])
        return into(result, out)


_grouped_experts = define_grouped_experts('twinkle_grouped_mm', TorchGroupedGemm())


def grouped_experts(permuted, tokens_per_expert, gate_up_proj, down_proj):
    for dim in down_proj.shape[1:]:
        if dim * permuted.element_size() % ALIGNMENT_BYTES:
            raise ValueError(f'the grouped_mm backend needs hidden and intermediate sizes that are multiples of '
                             f'{ALIGNMENT_BYTES} bytes; got {tuple(down_proj.shape[1:])} in {permuted.dtype}. '
                             f'Use backend="cpu" or "reference"')
    return _grouped_experts(permuted, tokens_per_expert, gate_up_proj, down_proj)
