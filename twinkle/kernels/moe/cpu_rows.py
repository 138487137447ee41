"""The row kernels of the CPU backends of moe_permute and moe_unpermute (see routing.py for the
contract): ``index_select`` for the copies and a (weighted) ``embedding_bag`` for the sums, a fused
gather, scale and sum in one pass with no (tokens, k, H) temporary."""
import torch
import torch.nn.functional as F


def copy_rows(src, slot_of_row, top_k, scale=None, dot_with=None):
    rows = src.index_select(0, slot_of_row // top_k)
    dots = None if dot_with is None else torch.linalg.vecdot(rows, dot_with)
    if scale is not None:
        rows.mul_(scale.reshape(-1)[slot_of_row].unsqueeze(1))
    return rows, dots


def sum_rows(src, row_map, weights=None):
    return F.embedding_bag(row_map, src.contiguous(), per_sample_weights=weights, mode='sum')
