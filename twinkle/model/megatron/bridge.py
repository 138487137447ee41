"""The megatron-core model that mirrors a Hugging Face Llama / Qwen2 / Qwen3 / Qwen3-MoE.

twinkle's own bridge (mcore-bridge needs peft<0.21 and modelscope): ``architecture`` reads the HF
config once and checks the parallel sizes against it (pure Python, before any process group);
``transformer_config`` and ``gpt_model`` build the matching megatron-core ``GPTModel`` for one
pipeline stage; ``bridge_keys`` moves the weights between the two layouts.

The layer spec is megatron-core's local one (no Transformer Engine, no apex) with two changes: its
norms are ``RMSNorm`` below instead of ``WrappedTorchNorm``, which refuses sequence parallelism,
and the MoE router gates with a plain linear (``_router_class``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch

from twinkle.utils.logger import get_logger

from . import require_megatron

logger = get_logger(__name__)

SUPPORTED_MODEL_TYPES = ('llama', 'qwen2', 'qwen3', 'qwen3_moe')
# Megatron's RotaryEmbedding scales 'llama3' rope with these constants and only the factor as input.
_MEGATRON_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What of an HF config shapes the Megatron model and its weights."""
    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: Optional[float]
    max_positions: int
    init_std: float
    attention_dropout: float
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    norm_topk_prob: bool = True
    moe_layers: Tuple[bool, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]


def architecture(hf_config) -> Architecture:
    """The HF config's shapes, or a ValueError naming the field twinkle's bridge cannot map."""
    model_type = getattr(hf_config, 'model_type', None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f'model_type {model_type!r} is not supported by the Megatron bridge '
                         f'(supported: {", ".join(SUPPORTED_MODEL_TYPES)})')
    if getattr(hf_config, 'hidden_act', 'silu') != 'silu':
        raise ValueError(f'hidden_act must be silu for the Megatron bridge, got {hf_config.hidden_act!r}')
    for flag in ('attention_bias', 'mlp_bias'):
        if model_type != 'qwen2' and getattr(hf_config, flag, False):
            raise ValueError(f'{flag}=True is not supported by the Megatron bridge for {model_type}')
    if any(kind != 'full_attention' for kind in getattr(hf_config, 'layer_types', None) or ()):
        raise ValueError('layer_types with sliding-window attention are not supported by the Megatron bridge')
    heads = hf_config.num_attention_heads
    moe = _moe_fields(hf_config) if model_type == 'qwen3_moe' else {}
    return Architecture(
        model_type=model_type, num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size, num_heads=heads,
        num_kv_heads=getattr(hf_config, 'num_key_value_heads', None) or heads,
        head_dim=getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size, tied_embeddings=bool(getattr(hf_config, 'tie_word_embeddings', False)),
        qkv_bias=model_type == 'qwen2', qk_norm=model_type in ('qwen3', 'qwen3_moe'),
        norm_eps=hf_config.rms_norm_eps, **_rope_fields(hf_config),
        max_positions=hf_config.max_position_embeddings, init_std=getattr(hf_config, 'initializer_range', 0.02),
        attention_dropout=float(getattr(hf_config, 'attention_dropout', 0.0)), **moe)


def _rope_fields(hf_config) -> dict:
    """rope theta and the llama3 factor (transformers 5 keeps both in ``rope_parameters``)."""
    rope = dict(getattr(hf_config, 'rope_parameters', None) or {})
    theta = rope.get('rope_theta', getattr(hf_config, 'rope_theta', 10000.0))
    kind = rope.get('rope_type', 'default')
    if kind == 'default':
        return dict(rope_theta=float(theta), rope_scaling_factor=None)
    if kind == 'llama3' and all(rope.get(k) == v for k, v in _MEGATRON_LLAMA3_ROPE.items()):
        return dict(rope_theta=float(theta), rope_scaling_factor=float(rope['factor']))
    raise ValueError(f'rope_parameters {rope} are not supported by the Megatron bridge (default rope, or '
                     f'llama3 with {_MEGATRON_LLAMA3_ROPE})')


def _moe_fields(hf_config) -> dict:
    only_dense = set(getattr(hf_config, 'mlp_only_layers', None) or ())
    step = getattr(hf_config, 'decoder_sparse_step', 1)
    layers = tuple(layer not in only_dense and hf_config.num_experts > 0 and (layer + 1) % step == 0
                   for layer in range(hf_config.num_hidden_layers))
    return dict(num_experts=hf_config.num_experts, moe_ffn_hidden_size=hf_config.moe_intermediate_size,
                moe_topk=hf_config.num_experts_per_tok, norm_topk_prob=bool(hf_config.norm_topk_prob),
                moe_layers=layers)


def check_parallel_sizes(arch: Architecture, *, tp: int = 1, pp: int = 1, ep: int = 1,
                         vp: Optional[int] = None) -> None:
    """Raise a ValueError naming the size that does not fit the model (no process group needed)."""
    for name, size in (('tp', tp), ('pp', pp), ('ep', ep), ('vp', vp or 1)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f'{name} must be a positive int, got {size!r}')
    tp_split = (('num_attention_heads', arch.num_heads), ('num_key_value_heads', arch.num_kv_heads),
                ('intermediate_size', arch.ffn_hidden_size), ('moe_intermediate_size', arch.moe_ffn_hidden_size))
    for what, count in tp_split:
        if count % tp:
            raise ValueError(f'tp={tp} must divide the model\'s {what} ({count})')
    if pp > arch.num_layers:
        raise ValueError(f'pp={pp} is larger than the model\'s num_hidden_layers ({arch.num_layers})')
    if arch.num_layers % (pp * (vp or 1)):
        raise ValueError(f'pp={pp} x vp={vp or 1} must divide the model\'s num_hidden_layers ({arch.num_layers})')
    if ep > 1 and not arch.num_experts:
        raise ValueError(f'ep={ep} needs a mixture-of-experts model; {arch.model_type} has no experts')
    if arch.num_experts % ep:
        raise ValueError(f'ep={ep} must divide the model\'s num_experts ({arch.num_experts})')


def stage_layers(num_layers: int, *, pp_rank: int = 0, pp_size: int = 1, vp_stage: int = 0,
                 vp_size: int = 1) -> range:
    """Global indices of one model chunk's layers: chunk ``vp_stage * pp_size + pp_rank`` of equal chunks."""
    per_chunk = num_layers // (pp_size * vp_size)
    start = (vp_stage * pp_size + pp_rank) * per_chunk
    return range(start, start + per_chunk)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Rows of Megatron's vocab-parallel embedding and output layer: the vocab rounded up to tp."""
    return -(-vocab_size // tp) * tp


def transformer_config(hf_config, *, tp: int = 1, pp: int = 1, ep: int = 1, vp: Optional[int] = None,
                       sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                       device_type: str = 'cpu'):
    """megatron-core's TransformerConfig for ``hf_config`` at these parallel sizes.

    Experts are split over the tensor-parallel ranks like the dense MLP (Megatron's default
    ``expert_tensor_parallel_size = tp``), and each expert-parallel rank holds ``num_experts / ep``
    of them. Fusions are off: megatron-core fuses through Transformer Engine or apex, which the
    local layer spec does not use.
    """
    arch = architecture(hf_config)
    check_parallel_sizes(arch, tp=tp, pp=pp, ep=ep, vp=vp)
    if sequence_parallel and tp == 1:
        raise ValueError('sequence_parallel=True needs tp > 1')
    require_megatron()
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    fields = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        layernorm_epsilon=arch.norm_eps, normalization='RMSNorm', gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=arch.attention_dropout, init_method_std=arch.init_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
        expert_model_parallel_size=ep, sequence_parallel=sequence_parallel,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=device_type == 'cpu',
        bias_dropout_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    if arch.num_experts:
        fields.update(
            num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_topk, moe_layer_freq=[int(is_moe) for is_moe in arch.moe_layers],
            # HF: softmax over all experts, top-k, renormalise if norm_topk_prob. Megatron without
            # pre-softmax takes the top-k logits and softmaxes those: the same renormalised weights.
            moe_router_pre_softmax=not arch.norm_topk_prob, moe_router_score_function='softmax',
            moe_router_load_balancing_type='none', moe_aux_loss_coeff=0.0,
            # The all-to-all dispatcher opens a CUDA stream when it is built; all-gather runs anywhere.
            moe_grouped_gemm=False, moe_token_dispatcher_type='alltoall' if device_type == 'cuda' else 'allgather')
    logger.info('Megatron config for %s: tp=%d pp=%d ep=%d sequence_parallel=%s; local layer spec, fusions off '
                '(megatron-core fuses through Transformer Engine / apex)%s', arch.model_type, tp, pp, ep,
                sequence_parallel, f", MoE tokens dispatched by {fields['moe_token_dispatcher_type']}"
                if arch.num_experts else '')
    return TransformerConfig(**fields)


class RMSNorm(torch.nn.RMSNorm):
    """megatron-core's norm interface over ``torch.nn.RMSNorm`` that also runs sequence-parallel.

    With sequence parallelism each tensor-parallel rank normalises its own tokens, so the weight's
    gradient is partial: ``sequence_parallel`` on the weight is what Megatron's
    ``finalize_model_grads`` looks for to sum it over the tensor-parallel group.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def _with_rms_norms(layer_spec):
    """The local layer spec with RMSNorm in every norm slot it fills (IdentityOp slots stay)."""
    from megatron.core.transformer.identity_op import IdentityOp
    attention = layer_spec.submodules.self_attention
    qk_norms = {slot: RMSNorm for slot in ('q_layernorm', 'k_layernorm')
                if getattr(attention.submodules, slot) is not IdentityOp}
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules, **qk_norms))
    submodules = dataclasses.replace(layer_spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm,
                                     self_attention=attention)
    return dataclasses.replace(layer_spec, submodules=submodules)


@functools.lru_cache(maxsize=None)
def _router_class():
    """megatron-core's TopKRouter, its gate logits computed by ``F.linear``: 0.16.1's own gating
    tests ``te_general_gemm``, a name moe_utils defines only when Transformer Engine imports
    (NameError without it). Routing, its dtype (``moe_router_dtype``) and weights are TopKRouter's."""
    import torch.nn.functional as F
    from megatron.core.transformer.moe.router import TopKRouter
    dtypes = {'fp32': torch.float32, 'fp64': torch.float64}

    class Router(TopKRouter):
        def gating(self, input: torch.Tensor) -> torch.Tensor:
            dtype = dtypes.get(self.config.moe_router_dtype, input.dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(input.to(dtype), self.weight.to(dtype), bias)
    return Router


def _with_router(layer_spec):
    mlp = layer_spec.submodules.mlp
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=_router_class()))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))


def decoder_block_spec(hf_config, *, pp_rank: int = 0, pp_size: int = 1, vp_stage: int = 0, vp_size: int = 1):
    """The TransformerBlock spec of one model chunk: a dense or MoE layer spec per layer, RMSNorm last."""
    require_megatron()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    arch = architecture(hf_config)
    dense = _with_rms_norms(get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization='RMSNorm'))
    moe = _with_router(_with_rms_norms(get_gpt_layer_local_spec(
        num_experts=arch.num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm,
        normalization='RMSNorm'))) if arch.num_experts else None
    layers = stage_layers(arch.num_layers, pp_rank=pp_rank, pp_size=pp_size, vp_stage=vp_stage, vp_size=vp_size)
    return TransformerBlockSubmodules(layer_specs=[moe if arch.is_moe_layer(i) else dense for i in layers],
                                      layer_norm=RMSNorm)


def gpt_model(hf_config, config, *, pp_rank: Optional[int] = None, vp_stage: Optional[int] = None):
    """One pipeline stage's (and virtual stage's) GPTModel; Megatron's groups must be initialised.

    ``pp_rank`` defaults to this process's pipeline rank in Megatron's groups. The output is
    vocab-parallel (each tensor-parallel rank its slice of the padded vocab) and batch-first:
    ``[b, s, padded_vocab / tp]`` logits when called without labels.
    """
    require_megatron()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    arch = architecture(hf_config)
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size, vp_size = config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size or 1
    chunk = vp_stage or 0
    spec = decoder_block_spec(hf_config, pp_rank=pp_rank, pp_size=pp_size, vp_stage=chunk, vp_size=vp_size)
    return GPTModel(
        config, spec, vocab_size=padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=arch.max_positions,
        pre_process=pp_rank == 0 and chunk == 0, post_process=pp_rank == pp_size - 1 and chunk == vp_size - 1,
        parallel_output=True, share_embeddings_and_output_weights=arch.tied_embeddings,
        position_embedding_type='rope', rotary_percent=1.0, rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None, rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage)
