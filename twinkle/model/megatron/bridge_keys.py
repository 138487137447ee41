"""Weights between a Hugging Face checkpoint and the state dicts of megatron-core's GPTModel ranks.

``hf_to_mcore`` cuts one rank's state dict (one pipeline chunk, one tensor-parallel slice, its
experts) out of the HF tensors; ``mcore_to_hf`` puts the HF tensors of one pipeline chunk back
together from the state dicts of its tensor- and expert-parallel ranks. The HF state dict of the
whole model is the union over the chunks (each layer, the embedding and the head belong to one).

Key mapping (``L`` = HF layer, ``l`` = its index inside the chunk, ``e = ep_rank * E/ep + j``)::

    model.embed_tokens.weight               embedding.word_embeddings.weight      rows split over tp (vocab-parallel)
    lm_head.weight (untied)                 output_layer.weight                   rows split over tp
      tied: the last chunk's output_layer.weight is Megatron's copy of the embedding (pp > 1 only)
    model.norm.weight                       decoder.final_layernorm.weight
    model.layers.L.input_layernorm.weight   decoder.layers.l.input_layernorm.weight
    ...self_attn.{q,k,v}_proj.{weight,bias} ...self_attention.linear_qkv.{weight,bias}  grouped, rows split over tp
    ...self_attn.{q,k}_norm.weight          ...self_attention.{q,k}_layernorm.weight
    ...self_attn.o_proj.weight              ...self_attention.linear_proj.weight  columns split over tp
    ...post_attention_layernorm.weight      ...pre_mlp_layernorm.weight
    ...mlp.{gate,up}_proj.weight            ...mlp.linear_fc1.weight              [gate_r; up_r] for tp rank r
    ...mlp.down_proj.weight                 ...mlp.linear_fc2.weight              columns split over tp
    ...mlp.gate.weight                      ...mlp.router.weight
    ...mlp.experts.gate_up_proj[e]          ...mlp.experts.local_experts.j.linear_fc1.weight  [gate_r; up_r]
    ...mlp.experts.down_proj[e]             ...mlp.experts.local_experts.j.linear_fc2.weight  columns split over tp

Grouped QKV: per query group (kv head) its q heads, then its k head, then its v head; tp rank r
holds groups [r * G/tp, (r+1) * G/tp). HF experts come fused (``gate_up_proj`` / ``down_proj``, as
transformers 5 holds them) or per expert (``experts.E.{gate,up,down}_proj.weight``, as checkpoints
on disk hold them); both are read, ``expert_layout`` picks which one ``mcore_to_hf`` writes.
Experts are tensor-parallel like the dense MLP (Megatron's default expert_tensor_parallel_size = tp).

Vocab padding: when tp does not divide the vocab, the embedding and output layer get zero rows up
to ``padded_vocab_size``; ``mcore_to_hf`` drops them. Their logits are 0, not -inf: a loss over the
vocab-parallel logits must leave those columns out.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Tuple

import torch

from .bridge import Architecture, architecture, check_parallel_sizes, padded_vocab_size, stage_layers

EXPERT_LAYOUTS = ('fused', 'per_expert')
_ATTENTION_NORMS = (('self_attn.q_norm.weight', 'self_attention.q_layernorm.weight'),
                    ('self_attn.k_norm.weight', 'self_attention.k_layernorm.weight'))
_LAYER_NORMS = (('input_layernorm.weight', 'input_layernorm.weight'),
                ('post_attention_layernorm.weight', 'pre_mlp_layernorm.weight'))


def hf_to_mcore(hf_state: Mapping[str, torch.Tensor], hf_config, *, tp_rank: int = 0, tp_size: int = 1,
                pp_rank: int = 0, pp_size: int = 1, ep_rank: int = 0, ep_size: int = 1,
                vp_stage: int = 0, vp_size: int = 1) -> Dict[str, torch.Tensor]:
    """The state dict of one rank's GPTModel chunk (``load_state_dict(strict=True)`` takes it).

    ``hf_state`` may be lazy (``load_hf_state_dict``): only this rank's tensors are read.
    """
    arch = architecture(hf_config)
    check_parallel_sizes(arch, tp=tp_size, pp=pp_size, ep=ep_size, vp=vp_size)
    _check_ranks(tp_rank=(tp_rank, tp_size), pp_rank=(pp_rank, pp_size), ep_rank=(ep_rank, ep_size),
                 vp_stage=(vp_stage, vp_size))
    first, last = _chunk_ends(pp_rank, pp_size, vp_stage, vp_size)
    vocab_rows = padded_vocab_size(arch.vocab_size, tp_size)
    state = {}
    if first:
        state['embedding.word_embeddings.weight'] = _split(_pad_rows(hf_state['model.embed_tokens.weight'], vocab_rows),
                                                           0, tp_rank, tp_size)
    layers = stage_layers(arch.num_layers, pp_rank=pp_rank, pp_size=pp_size, vp_stage=vp_stage, vp_size=vp_size)
    for local, layer in enumerate(layers):
        source, target = f'model.layers.{layer}.', f'decoder.layers.{local}.'
        layer_state = _attention_to_mcore(hf_state, arch, source, tp_rank, tp_size)
        if arch.is_moe_layer(layer):
            layer_state.update(_experts_to_mcore(hf_state, arch, source, tp_rank, tp_size, ep_rank, ep_size))
        else:
            layer_state.update(_mlp_to_mcore(hf_state, source, tp_rank, tp_size))
        state.update({target + name: tensor for name, tensor in layer_state.items()})
    if last:
        state['decoder.final_layernorm.weight'] = hf_state['model.norm.weight']
        head = 'model.embed_tokens.weight' if arch.tied_embeddings else 'lm_head.weight'
        if not (arch.tied_embeddings and first):
            state['output_layer.weight'] = _split(_pad_rows(hf_state[head], vocab_rows), 0, tp_rank, tp_size)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def mcore_to_hf(shards: Mapping[Tuple[int, int], Mapping[str, torch.Tensor]], hf_config, *, tp_size: int = 1,
                ep_size: int = 1, pp_rank: int = 0, pp_size: int = 1, vp_stage: int = 0, vp_size: int = 1,
                expert_layout: str = 'per_expert') -> Dict[str, torch.Tensor]:
    """The HF tensors of one pipeline chunk, from its ranks' state dicts keyed by ``(tp_rank, ep_rank)``.

    Every (tp_rank, ep_rank) pair must be there; ranks that differ only in their data-parallel
    coordinate hold the same tensors, so one of them is enough. ``expert_layout='per_expert'``
    writes the layout Qwen3-MoE checkpoints have on disk, ``'fused'`` the one transformers 5 holds
    in memory.
    """
    arch = architecture(hf_config)
    check_parallel_sizes(arch, tp=tp_size, pp=pp_size, ep=ep_size, vp=vp_size)
    _check_ranks(pp_rank=(pp_rank, pp_size), vp_stage=(vp_stage, vp_size))
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f'expert_layout must be one of {", ".join(EXPERT_LAYOUTS)}, got {expert_layout!r}')
    grid = _grid(shards, tp_size, ep_size)
    tp_states = grid[0]
    first, last = _chunk_ends(pp_rank, pp_size, vp_stage, vp_size)
    hf = {}
    if first:
        hf['model.embed_tokens.weight'] = _gather(tp_states, 'embedding.word_embeddings.weight', 0)[:arch.vocab_size]
    layers = stage_layers(arch.num_layers, pp_rank=pp_rank, pp_size=pp_size, vp_stage=vp_stage, vp_size=vp_size)
    for local, layer in enumerate(layers):
        source, target = f'decoder.layers.{local}.', f'model.layers.{layer}.'
        tp_layer = [_strip(state, source) for state in tp_states]
        layer_hf = _attention_to_hf(tp_layer, arch)
        if arch.is_moe_layer(layer):
            layer_hf.update(_experts_to_hf([[_strip(state, source) for state in row] for row in grid], expert_layout))
        else:
            layer_hf.update(_mlp_to_hf(tp_layer))
        hf.update({target + name: tensor for name, tensor in layer_hf.items()})
    if last:
        hf['model.norm.weight'] = tp_states[0]['decoder.final_layernorm.weight']
        if not arch.tied_embeddings:
            hf['lm_head.weight'] = _gather(tp_states, 'output_layer.weight', 0)[:arch.vocab_size]
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def load_hf_state_dict(model_dir: str) -> Mapping[str, torch.Tensor]:
    """The safetensors weights of an HF model directory, read tensor by tensor as they are asked for."""
    return _SafetensorsDirectory(model_dir)


class _SafetensorsDirectory(Mapping):
    def __init__(self, model_dir: str):
        index = os.path.join(model_dir, 'model.safetensors.index.json')
        if os.path.exists(index):
            with open(index, encoding='utf-8') as file:
                weight_map = json.load(file)['weight_map']
            self._files = {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
        else:
            single = os.path.join(model_dir, 'model.safetensors')
            if not os.path.exists(single):
                raise FileNotFoundError(f'model_dir {model_dir!r} has no model.safetensors(.index.json)')
            from safetensors import safe_open
            with safe_open(single, framework='pt') as handle:
                self._files = {name: single for name in handle.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self._files[name], framework='pt') as handle:
            return handle.get_tensor(name)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


# --- one layer, HF -> Megatron ------------------------------------------------------------------

def _attention_to_mcore(hf, arch: Architecture, source: str, tp_rank: int, tp_size: int) -> dict:
    kinds = ('weight', 'bias') if arch.qkv_bias else ('weight',)
    state = {f'self_attention.linear_qkv.{kind}': _fuse_qkv(
        arch, [hf[f'{source}self_attn.{p}_proj.{kind}'] for p in 'qkv'], tp_rank, tp_size) for kind in kinds}
    state['self_attention.linear_proj.weight'] = _split(hf[source + 'self_attn.o_proj.weight'], 1, tp_rank, tp_size)
    norms = _LAYER_NORMS + (_ATTENTION_NORMS if arch.qk_norm else ())
    state.update({megatron: hf[source + name] for name, megatron in norms})
    return state


def _mlp_to_mcore(hf, source: str, tp_rank: int, tp_size: int) -> dict:
    gate, up, down = (hf[f'{source}mlp.{p}_proj.weight'] for p in ('gate', 'up', 'down'))
    return _fc_to_mcore(gate, up, down, tp_rank, tp_size, 'mlp.')


def _experts_to_mcore(hf, arch: Architecture, source: str, tp_rank: int, tp_size: int, ep_rank: int,
                      ep_size: int) -> dict:
    per_rank = arch.num_experts // ep_size
    state = {'mlp.router.weight': hf[source + 'mlp.gate.weight']}
    fused = source + 'mlp.experts.gate_up_proj' in hf
    for local in range(per_rank):
        expert = ep_rank * per_rank + local
        if fused:
            gate, up = hf[source + 'mlp.experts.gate_up_proj'][expert].chunk(2)
            down = hf[source + 'mlp.experts.down_proj'][expert]
        else:
            gate, up, down = (hf[f'{source}mlp.experts.{expert}.{p}_proj.weight'] for p in ('gate', 'up', 'down'))
        state.update(_fc_to_mcore(gate, up, down, tp_rank, tp_size, f'mlp.experts.local_experts.{local}.'))
    return state


def _fc_to_mcore(gate, up, down, tp_rank: int, tp_size: int, prefix: str) -> dict:
    """A SwiGLU MLP's tp slice: fc1 = [gate rows; up rows] of this rank, fc2 = its down columns."""
    fc1 = torch.cat([_split(gate, 0, tp_rank, tp_size), _split(up, 0, tp_rank, tp_size)])
    return {prefix + 'linear_fc1.weight': fc1, prefix + 'linear_fc2.weight': _split(down, 1, tp_rank, tp_size)}


def _fuse_qkv(arch: Architecture, qkv: List[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
    """[q; k; v] (weights or biases) into Megatron's grouped rows, then this tp rank's groups."""
    groups, rows = arch.num_kv_heads, _group_rows(arch)
    trailing = qkv[0].shape[1:]
    grouped = torch.cat([t.reshape(groups, n, *trailing) for t, n in zip(qkv, rows)], dim=1)
    return _split(grouped, 0, tp_rank, tp_size).reshape(-1, *trailing)


# --- one layer, Megatron -> HF ------------------------------------------------------------------

def _attention_to_hf(tp_layer: List[dict], arch: Architecture) -> dict:
    kinds = ('weight', 'bias') if arch.qkv_bias else ('weight',)
    hf = {}
    for kind in kinds:
        for p, tensor in zip('qkv', _unfuse_qkv(arch, [s[f'self_attention.linear_qkv.{kind}'] for s in tp_layer])):
            hf[f'self_attn.{p}_proj.{kind}'] = tensor
    hf['self_attn.o_proj.weight'] = _gather(tp_layer, 'self_attention.linear_proj.weight', 1)
    norms = _LAYER_NORMS + (_ATTENTION_NORMS if arch.qk_norm else ())
    hf.update({name: tp_layer[0][megatron] for name, megatron in norms})
    return hf


def _mlp_to_hf(tp_layer: List[dict]) -> dict:
    gate, up, down = _fc_to_hf(tp_layer, 'mlp.')
    return {'mlp.gate_proj.weight': gate, 'mlp.up_proj.weight': up, 'mlp.down_proj.weight': down}


def _experts_to_hf(grid: List[List[dict]], expert_layout: str) -> dict:
    """The router and experts of one layer from its state dicts, ``grid[ep_rank][tp_rank]``."""
    experts = [_fc_to_hf(tp_layer, f'mlp.experts.local_experts.{local}.')
               for tp_layer in grid for local in range(_local_expert_count(tp_layer[0]))]
    hf = {'mlp.gate.weight': grid[0][0]['mlp.router.weight']}
    if expert_layout == 'fused':
        hf['mlp.experts.gate_up_proj'] = torch.stack([torch.cat([gate, up]) for gate, up, _ in experts])
        hf['mlp.experts.down_proj'] = torch.stack([down for _, _, down in experts])
        return hf
    for expert, tensors in enumerate(experts):
        hf.update({f'mlp.experts.{expert}.{p}_proj.weight': t for p, t in zip(('gate', 'up', 'down'), tensors)})
    return hf


def _fc_to_hf(tp_layer: List[dict], prefix: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up and down of a SwiGLU MLP from its tp slices (the inverse of ``_fc_to_mcore``)."""
    gates, ups = zip(*(state[prefix + 'linear_fc1.weight'].chunk(2) for state in tp_layer))
    return torch.cat(gates), torch.cat(ups), _gather(tp_layer, prefix + 'linear_fc2.weight', 1)


def _unfuse_qkv(arch: Architecture, shards: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    rows = _group_rows(arch)
    trailing = shards[0].shape[1:]
    grouped = torch.cat([s.reshape(-1, sum(rows), *trailing) for s in shards])
    return tuple(part.reshape(-1, *trailing) for part in grouped.split(rows, dim=1))


def _local_expert_count(layer_state: Mapping[str, torch.Tensor]) -> int:
    return sum(1 for name in layer_state if name.startswith('mlp.experts.local_experts.')
               and name.endswith('.linear_fc1.weight'))


# --- shared helpers ----------------------------------------------------------------------------

def _group_rows(arch: Architecture) -> List[int]:
    """Rows of one query group in the fused QKV: its q heads, its k head, its v head."""
    return [arch.num_heads // arch.num_kv_heads * arch.head_dim, arch.head_dim, arch.head_dim]


def _split(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return tensor.chunk(size, dim=dim)[rank]


def _gather(states: List[Mapping[str, torch.Tensor]], name: str, dim: int) -> torch.Tensor:
    return torch.cat([state[name] for state in states], dim=dim)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict:
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def _chunk_ends(pp_rank: int, pp_size: int, vp_stage: int, vp_size: int) -> Tuple[bool, bool]:
    """Whether a model chunk holds the embedding (first) and the final norm and head (last)."""
    return pp_rank == 0 and vp_stage == 0, pp_rank == pp_size - 1 and vp_stage == vp_size - 1


def _check_ranks(**ranks: Tuple[int, int]) -> None:
    for name, (rank, size) in ranks.items():
        if not 0 <= rank < size:
            raise ValueError(f'{name}={rank} is outside [0, {size})')


def _grid(shards: Mapping[Tuple[int, int], Mapping], tp_size: int, ep_size: int) -> List[List[Mapping]]:
    """``shards`` as ``grid[ep_rank][tp_rank]``, or a ValueError naming the pairs that are missing."""
    for tp_rank, ep_rank in shards:
        _check_ranks(tp_rank=(tp_rank, tp_size), ep_rank=(ep_rank, ep_size))
    missing = [(t, e) for e in range(ep_size) for t in range(tp_size) if (t, e) not in shards]
    if missing:
        raise ValueError(f'shards must hold every (tp_rank, ep_rank) pair; missing {missing}')
    return [[shards[(t, e)] for t in range(tp_size)] for e in range(ep_size)]
