"""MoE combine in plain PyTorch: the oracle of the tests and the fallback on every device.
Like Hugging Face's experts: weight each gathered row in the input dtype, then sum the k rows."""
import torch


def moe_unpermute(expert_out: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    # index_select, not expert_out[row_map]: a negative row must fail, never wrap to the last row.
    rows = expert_out.index_select(0, row_map.reshape(-1)).view(*row_map.shape, expert_out.shape[-1])
    return (rows * topk_weights.unsqueeze(-1)).sum(dim=1)
