"""SwiGLU expert MLPs over contiguous row groups (the expert half of an MoE layer).

    expert_out = grouped_experts(permuted, tokens_per_expert, gate_up_proj, down_proj)

Rows of expert e (after those of experts < e): ``down_proj[e] @ (silu(g) * u)`` with
``[g; u] = gate_up_proj[e] @ x``. That is Qwen3-MoE's fused layout: ``gate_up_proj`` (E, 2I, H)
holds the gate rows then the up rows, ``down_proj`` is (E, H, I). Every row is computed by
exactly its expert: no per-token masks and no work for experts without tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import registry
from ...checks import (check_values, require_group_sizes, require_integer, require_same_device, require_size,
                       require_tensor)
from ...registry import Impl


def grouped_mm_check(target) -> Optional[str]:
    """``torch._grouped_mm`` runs here: torch >= 2.9 (the first with a CPU kernel and sm80 support)
    and, on CUDA, an sm80+ GPU."""
    if not hasattr(torch, '_grouped_mm') or torch.torch_version.TorchVersion(torch.__version__) < '2.9':
        return f'torch._grouped_mm needs torch >= 2.9, this is {torch.__version__}'
    if target.type == 'cuda':
        if not torch.cuda.is_available():
            return 'no CUDA GPU visible to torch'
        if target.compute_capability < (8, 0):
            return f'torch._grouped_mm needs an sm80+ GPU, this one is sm{"".join(map(str, target.compute_capability))}'
    return None


registry.register(
    'grouped_experts',
    {'reference': 'reference', 'cpu': 'cpu',
     'grouped_mm': Impl('grouped_mm', devices=('cpu', 'cuda'), check=grouped_mm_check),
     'triton': 'triton', 'npu': 'npu'},
    package=__name__,
    priority={
        'cuda': ['grouped_mm', 'triton', 'reference'],
        'npu': ['npu', 'reference'],
        'cpu': ['cpu', 'grouped_mm', 'reference'],
        '*': ['reference'],
    },
)


def grouped_experts(permuted: torch.Tensor, tokens_per_expert: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``permuted`` (rows, H) grouped by expert, ``tokens_per_expert`` (E,) -> (rows, H).
    Differentiable in ``permuted``, ``gate_up_proj`` and ``down_proj``."""
    require_tensor('permuted', permuted, floating=True, dims=(2,))
    require_tensor('tokens_per_expert', tokens_per_expert, dims=(1,))
    require_integer('tokens_per_expert', tokens_per_expert)
    require_tensor('gate_up_proj', gate_up_proj, floating=True, dims=(3,))
    require_tensor('down_proj', down_proj, floating=True, dims=(3,))
    experts, double_intermediate, hidden = gate_up_proj.shape
    if double_intermediate % 2:
        raise ValueError(f'gate_up_proj: dim 1 must hold the gate rows then the up rows (an even size), '
                         f'got shape {tuple(gate_up_proj.shape)}')
    require_size('gate_up_proj', hidden, permuted.shape[1], 'dim 2 equal to the hidden size of permuted,')
    expected_down = (experts, hidden, double_intermediate // 2)
    if tuple(down_proj.shape) != expected_down:
        raise ValueError(f'down_proj must have shape (experts, hidden, intermediate) = {expected_down}, '
                         f'got {tuple(down_proj.shape)}')
    require_size('tokens_per_expert', tokens_per_expert.shape[0], experts,
                 'length equal to the experts of gate_up_proj,')
    for name, weight in (('gate_up_proj', gate_up_proj), ('down_proj', down_proj)):
        if weight.dtype != permuted.dtype:
            raise ValueError(f'{name} must have the dtype of permuted ({permuted.dtype}), got {weight.dtype}')
    require_same_device('permuted', permuted, tokens_per_expert=tokens_per_expert, gate_up_proj=gate_up_proj,
                        down_proj=down_proj)
    if check_values():  # moe_permute computes them: only a debug run reads them (a host sync)
        require_group_sizes('tokens_per_expert', tokens_per_expert, permuted.shape[0], 'the rows of permuted')
    return registry.resolve('grouped_experts', backend, permuted.device)(
        permuted, tokens_per_expert, gate_up_proj, down_proj)


__all__ = ['grouped_experts']
