"""The MoE op family: dispatch, experts and combine of an MoE layer in one process.

    permuted, tokens_per_expert, row_map = moe_permute(hidden, topk_ids, num_experts)
    expert_out = grouped_experts(permuted, tokens_per_expert, gate_up_proj, down_proj)
    out = moe_unpermute(expert_out, row_map, topk_weights)

Each op keeps its own folder (``permute/``, ``unpermute/``, ``grouped_experts/``: one module per
backend, as every op); what they share sits here: ``routing.py`` (the index bookkeeping),
``triton_rows.py`` (the row-moving Triton kernels) and ``module.py`` (``TwinkleMoeExperts``, the
module that takes over Hugging Face's experts).
"""
from .grouped_experts import grouped_experts
from .permute import moe_permute
from .unpermute import moe_unpermute
from .module import TwinkleMoeExperts  # noqa: E402  (the module wraps the ops above)

__all__ = ['TwinkleMoeExperts', 'grouped_experts', 'moe_permute', 'moe_unpermute']
