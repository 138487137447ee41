"""Grouped SwiGLU experts in plain PyTorch: one expert after the other on its slice of rows.
The oracle of the tests and the fallback on every device, registered as the op
``twinkle_ref::grouped_experts`` (autograd by recompute, see ``kernels/library.py``). The group
sizes are read on the host (``tolist``), so the fake kernel states the output shape instead."""
import torch
import torch.nn.functional as F

from ...library import reference_op


def _grouped_experts(permuted: torch.Tensor, tokens_per_expert: torch.Tensor, gate_up_proj: torch.Tensor,
                     down_proj: torch.Tensor) -> torch.Tensor:
    outputs = [permuted.new_zeros(0, down_proj.shape[1])]
    for expert, rows in enumerate(permuted.split(tokens_per_expert.tolist())):
        if rows.shape[0]:
            gate, up = F.linear(rows, gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, down_proj[expert]))
    return torch.cat(outputs)


def _grouped_experts_fake(permuted, tokens_per_expert, gate_up_proj, down_proj):
    """One output row per row of ``permuted`` (the group sizes sum to its rows)."""
    return permuted.new_empty(permuted.shape[0], down_proj.shape[1])


grouped_experts = reference_op('grouped_experts', _grouped_experts, fake=_grouped_experts_fake)
