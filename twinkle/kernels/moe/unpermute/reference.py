"""MoE combine in plain PyTorch: the oracle of the tests and the fallback on every device.
Like Hugging Face's experts: weight each gathered row in the input dtype, then sum the k rows.
Registered as the op ``twinkle_ref::moe_unpermute`` (autograd by recompute, see ``kernels/library.py``)."""
import torch

from ...library import reference_op


def _moe_unpermute(expert_out: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    # index_select, not expert_out[row_map]: a negative row must fail, never wrap to the last row.
    rows = expert_out.index_select(0, row_map.reshape(-1)).view(*row_map.shape, expert_out.shape[-1])
    return (rows * topk_weights.unsqueeze(-1)).sum(dim=1)


moe_unpermute = reference_op('moe_unpermute', _moe_unpermute)
