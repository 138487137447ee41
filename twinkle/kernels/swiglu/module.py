"""A SwiGLU MLP that can take over Hugging Face ``LlamaMLP`` / ``Qwen2MLP`` / ``Qwen3MLP`` in place.

It keeps HF's attribute names (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``), so
``kernelize`` can swap the class of a loaded MLP without touching its state dict. The fused
forward is only right when the activation is SiLU; an MLP built with another ``hidden_act``
raises instead of silently computing SwiGLU.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import overwrite_refusal, swiglu


# What HF builds for hidden_act 'silu' (matched by name: kernels do not import transformers).
HF_SILU_CLASSES = {'transformers.activations.SiLUActivation'}


def is_silu(act_fn) -> bool:
    """True for nn.SiLU, F.silu and HF's SiLU activation: what the fused forward computes."""
    if act_fn is F.silu or isinstance(act_fn, nn.SiLU):
        return True
    cls = type(act_fn)
    return f'{cls.__module__}.{cls.__qualname__}' in HF_SILU_CLASSES


class TwinkleSwiGLUMLP(nn.Module):

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_silu(self.act_fn):
            raise ValueError(f'{type(self).__name__} computes silu(gate) * up, but this MLP\'s act_fn is '
                             f'{self.act_fn!r}; do not replace MLPs whose hidden_act is not silu')
        gate, up = self.gate_proj(x), self.up_proj(x)
        # The projections' outputs are read by nothing but swiglu: backward may write over them.
        inplace = torch.is_grad_enabled() and overwrite_refusal(gate) is None and overwrite_refusal(up) is None
        return self.down_proj(swiglu(gate, up, inplace=inplace))
