"""Grouped SwiGLU experts on Ascend: the GEMM of function.py's shared ops (``twinkle_npu::grouped_*``) is
``torch_npu.npu_grouped_matmul`` with the group sizes as a device tensor (``group_list_type=1``):
``group_type=0`` splits the rows of x (forward and input gradient, one (rows, N) output with
``split_item=2``); ``group_type=2`` splits the reduction dim, which is the per-expert weight
gradient x_e^T dy_e as one (E, M, N) output (``split_item=3``). The transposed operand must stay a
transposed view. Without rows the kernel is skipped.
"""
from twinkle.backends.npu import torch_npu

from .function import define_grouped_experts, into


class NpuGroupedGemm:
    @staticmethod
    def groups(tokens_per_expert, rows):
        return tokens_per_expert.long()

    @staticmethod
    def rows(a, b, counts, out=None, accumulate=False):
        if a.shape[0]:
            result = _grouped_matmul(a, b, counts, split_item=2, group_type=0)
        else:
            result = a.new_empty(0, b.shape[2])
        return into(result, out, accumulate)

    @staticmethod
    def per_group(a, b, counts, out=None):
        if a.shape[0]:
            result = _grouped_matmul(a.t(), b, counts, split_item=3, group_type=2)
        else:
            result = a.new_zeros(counts.shape[0], a.shape[1], b.shape[1])
        return into(result, out)


def _grouped_matmul(x, weight, counts, split_item, group_type):
    return torch_npu().npu_grouped_matmul([x], [weight], group_list=counts, split_item=split_item,
                                          group_type=group_type, group_list_type=1)[0]


grouped_experts = define_grouped_experts('twinkle_npu', NpuGroupedGemm())
