"""MoE dispatch on Ascend through ``torch_npu.npu_moe_token_permute`` (differentiated by torch_npu).

Its ``sorted_indices`` output gives, for each choice slot t * k + j, the row the copy went to:
exactly ``row_map`` flattened (int32 there, int64 here). The kernel wants int32 expert ids and
rejects empty inputs, which take the reference path.
"""
import torch

from twinkle.backends.npu import torch_npu

from ..routing import count_per_expert
from . import reference


def moe_permute(hidden, topk_ids, num_experts):
    if hidden.shape[0] == 0:
        return reference.moe_permute(hidden, topk_ids, num_experts)
    permuted, sorted_indices = torch_npu().npu_moe_token_permute(hidden, topk_ids.to(torch.int32))
    tokens_per_expert = count_per_expert(topk_ids.reshape(-1), num_experts)
    return permuted, tokens_per_expert, sorted_indices.long().view(topk_ids.shape)
