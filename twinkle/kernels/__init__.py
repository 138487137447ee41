"""Kernels with one public function per op and a registry choosing the backend per device.

    from twinkle import kernels
    y = kernels.rms_norm(x, weight)                  # best backend for x's device
    kernels.select('rms_norm')                       # Selection(backend=..., reason=...)
    kernels.configure(rms_norm='reference')          # force for the whole run
"""
from .registry import KernelUnavailableError, configure, ops, report, select
from .rms_norm import TwinkleRMSNorm, rms_norm
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .fused_linear_logprobs import fused_linear_logprobs
from .rope import apply_rotary_pos_emb
from .swiglu import TwinkleSwiGLUMLP, swiglu
from .varlen_attention import varlen_attention, varlen_attention_lse, varlen_attention_lse_backward
from .moe import TwinkleMoeExperts, grouped_experts, moe_permute, moe_unpermute
from .kernelize import kernelize  # noqa: E402  (after the ops it maps to)

__all__ = ['KernelUnavailableError', 'TwinkleRMSNorm', 'TwinkleSwiGLUMLP', 'apply_rotary_pos_emb', 'configure',
           'fused_linear_cross_entropy', 'fused_linear_logprobs',
           'kernelize', 'ops', 'report', 'rms_norm', 'select', 'swiglu',
           'TwinkleMoeExperts', 'grouped_experts', 'moe_permute', 'moe_unpermute']
