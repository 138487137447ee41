"""The experts of an MoE block as an nn.Module that takes over Hugging Face's fused 3-D experts
(``Qwen3MoeExperts``) in place: dispatch, grouped SwiGLU experts and combine through twinkle's ops.

It keeps HF's names (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), ``num_experts``,
``act_fn``) and HF's call ``experts(hidden_states, top_k_index, top_k_weights)``, so ``kernelize``
swaps the class of a loaded model's experts without touching its state dict, and the block around
it (router, router logits, aux loss) stays HF's own.

Why the experts and not the whole sparse block: peft's LoRA on expert parameters
(``target_parameters``) wraps this module and applies the adapter while the module is being
called, through a parametrization of ``gate_up_proj`` / ``down_proj``. Reading the parameters
through ``self`` inside ``forward`` is what makes the LoRA delta part of the computation; a block
that read ``block.experts.gate_up_proj`` itself would silently bypass it.

Where the rows come from is the token dispatcher's business (``dispatch.py``): all experts in this
process by default; ``apply_expert_parallel`` slices the parameters and installs an all-to-all one.
``num_experts`` is the count this module holds (HF's convention under expert parallelism too).
"""
from typing import Optional

import torch
from torch import nn

from ..swiglu.module import is_silu
from .dispatch import LOCAL_DISPATCHER, TokenDispatcher
from .grouped_experts import grouped_experts

# The layout flags HF's experts carry (use_experts_implementation), as this module computes them.
SWIGLU_LAYOUT = {'has_gate': True, 'has_bias': False, 'is_transposed': False, 'is_concatenated': True,
                 'has_post_expert_norm': False}


class TwinkleMoeExperts(nn.Module):

    # A class default, not set in __init__: kernelize swaps the class of HF's modules (no __init__ runs).
    token_dispatcher: TokenDispatcher = LOCAL_DISPATCHER

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Like HF's grouped_mm experts, the experts run in the parameters' dtype (under autocast the
        input may differ) and the result has the input's dtype."""
        self._require_swiglu_layout()
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj  # through self: where peft's LoRA applies
        dispatched = self.token_dispatcher.dispatch(hidden_states.to(gate_up_proj.dtype), top_k_index,
                                                    self.num_experts)
        expert_out = grouped_experts(dispatched.rows, dispatched.tokens_per_expert, gate_up_proj, down_proj)
        return self.token_dispatcher.combine(expert_out, dispatched, top_k_weights).to(hidden_states.dtype)

    @staticmethod
    def swiglu_mismatch(experts: nn.Module) -> Optional[str]:
        """Why ``experts`` (HF's or ours) is not SwiGLU with [gate; up] concatenated and no bias, or
        None. HF experts built with another activation, biases or a transposed / interleaved layout
        compute something else, which this module must not silently replace."""
        unsupported = [f'{name}={getattr(experts, name)}' for name, expected in SWIGLU_LAYOUT.items()
                       if getattr(experts, name, expected) != expected]
        if not is_silu(getattr(experts, 'act_fn', None)):
            unsupported.append(f'act_fn={getattr(experts, "act_fn", None)!r}')
        return ', '.join(unsupported) or None

    def _require_swiglu_layout(self) -> None:
        mismatch = self.swiglu_mismatch(self)
        if mismatch:
            raise ValueError(f'{type(self).__name__} computes SwiGLU experts with [gate; up] concatenated and no '
                             f'bias; these experts have {mismatch}: do not replace them')
