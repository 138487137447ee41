"""MoE combine on Ascend through ``torch_npu.npu_moe_token_unpermute`` (differentiated by torch_npu).

It takes the slot -> row map as ``sorted_indices`` (int32, flat) and the routing weights as
``probs``; empty inputs take the reference path.
"""
import torch

from twinkle.backends.npu import torch_npu

from . import reference


def moe_unpermute(expert_out, row_map, topk_weights):
    if row_map.numel() == 0:
        return reference.moe_unpermute(expert_out, row_map, topk_weights)
    return torch_npu().npu_moe_token_unpermute(expert_out, row_map.reshape(-1).to(torch.int32), probs=topk_weights)
