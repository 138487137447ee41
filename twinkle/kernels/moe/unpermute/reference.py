"""MoE combine in plain PyTorch: the oracle of the tests and the fallback on every device.
Like Hugging Face's experts: weight each gathered row in the input dtype, then sum the k rows."""
import torch


def moe_unpermute(expert_out: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return (expert_out[row_map] * topk_weights.unsqueeze(-1)).sum(dim=1)
