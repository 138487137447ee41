"""LoRA on megatron-core's tensor-parallel linears, with Hugging Face / peft names.

Each adapted HF projection (``q_proj`` ... ``down_proj``) keeps its own A and B, as peft has them,
so the adapter saves as a peft checkpoint and trains like peft on the HF model. Megatron fuses
q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``; the wrapper adds each part's update in
the fused output's layout.

Sharding follows the base weight:
- column-parallel (qkv, fc1; W rows split over tp): A whole on every rank, B split by rows.
  ``x @ A.T`` is r wide, so that (not x) is what sequence parallelism all-gathers.
- row-parallel (proj, fc2; W columns split): A split by columns, B whole; ``x @ A.T`` is a
  partial sum, reduce-scattered over the sequence (or all-reduced) like the base output.
With sequence parallelism the whole factor (column A, row B) sees only this rank's tokens, so it is
marked ``sequence_parallel`` and its gradient is summed over tp, as for the norm weights.
Initialisation is peft's (A kaiming-uniform, B zero) from a generator seeded by the seed and the HF
name, so every layout (and every rank) starts from the same adapter.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from twinkle.utils.logger import get_logger

logger = get_logger(__name__)

ATTENTION = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
MLP = ('gate_proj', 'up_proj', 'down_proj')
# megatron module (under decoder.layers.i.) -> its HF parts in output order, and how its weight is split
FUSED = {'self_attention.linear_qkv': (('q_proj', 'k_proj', 'v_proj'), 'column', 'self_attn'),
         'self_attention.linear_proj': (('o_proj',), 'row', 'self_attn'),
         'mlp.linear_fc1': (('gate_proj', 'up_proj'), 'column', 'mlp'),
         'mlp.linear_fc2': (('down_proj',), 'row', 'mlp')}


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What of a peft ``LoraConfig`` MegatronModel applies (everything else is refused by name)."""
    rank: int
    alpha: float
    dropout: float
    use_rslora: bool
    targets: Tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def lora_settings(config, moe: bool) -> LoraSettings:
    """The parts of ``config`` (a peft LoraConfig) this wrapper implements, or a ValueError naming the field."""
    from peft import LoraConfig
    if not isinstance(config, LoraConfig):
        raise ValueError(f'config must be a peft LoraConfig for MegatronModel, got {type(config).__name__}')
    refused = {'use_dora': bool(config.use_dora), 'modules_to_save': bool(config.modules_to_save),
               'layers_to_transform': config.layers_to_transform is not None,
               'rank_pattern': bool(config.rank_pattern), 'alpha_pattern': bool(config.alpha_pattern),
               'target_parameters': bool(getattr(config, 'target_parameters', None)),
               "bias != 'none'": config.bias != 'none', 'init_lora_weights != True': config.init_lora_weights is not True}
    named = [field for field, used in refused.items() if used]
    if named:
        raise ValueError(f'LoraConfig {", ".join(named)}: not supported by MegatronModel LoRA (supported: r, '
                         f'lora_alpha, lora_dropout, use_rslora, target_modules)')
    supported = ATTENTION if moe else ATTENTION + MLP
    targets = config.target_modules
    if targets == 'all-linear':
        targets = supported
        if moe:
            logger.info("LoRA target_modules='all-linear' on an MoE model: the attention projections (%s); the "
                        'router and the experts are not adapted on MegatronModel', ', '.join(ATTENTION))
    elif isinstance(targets, str) or not targets:
        raise ValueError(f"LoraConfig target_modules must be 'all-linear' or a list of names from {supported} for "
                         f'MegatronModel (regular expressions are not supported), got {targets!r}')
    unknown = sorted(set(targets) - set(supported))
    if unknown:
        raise ValueError(f'LoraConfig target_modules {unknown} cannot be adapted on MegatronModel'
                         f'{" (an MoE model: attention only)" if moe else ""}; supported: {list(supported)}')
    return LoraSettings(rank=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                        use_rslora=config.use_rslora, targets=tuple(t for t in supported if t in targets))


class LoraParallelLinear(nn.Module):
    """A Megatron column- or row-parallel linear plus one LoRA per HF part, any number of adapters.

    ``part_sizes`` are the parts' output rows on this rank (column-parallel) and ``layout`` turns the
    parts' updates into the fused output (Megatron's grouped q/k/v, or [gate; up])."""

    def __init__(self, base: nn.Module, *, kind: str, hf_prefix: str, parts: Sequence[str],
                 part_sizes: Sequence[int], layout, sequence_parallel: bool, tp_size: int, tp_rank: int):
        super().__init__()
        self.base_layer = base
        self.kind, self.hf_prefix, self.parts = kind, hf_prefix, tuple(parts)
        self.part_sizes, self.layout = tuple(part_sizes), layout
        self.sequence_parallel, self.tp_size, self.tp_rank = sequence_parallel, tp_size, tp_rank
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.settings: Dict[str, LoraSettings] = {}
        self.dropouts = nn.ModuleDict()
        self.active: Optional[str] = None

    def hf_name(self, part: str) -> str:
        return f'{self.hf_prefix}.{part}'

    def add(self, adapter: str, settings: LoraSettings, seed: int) -> List[nn.Parameter]:
        """Adapter ``adapter`` on the parts it targets; returns its new parameters."""
        weight = self.base_layer.weight
        in_local = weight.shape[1]
        in_full = in_local * (self.tp_size if self.kind == 'row' else 1)
        a_params, b_params = nn.ParameterDict(), nn.ParameterDict()
        for part, rows in zip(self.parts, self.part_sizes):
            if part not in settings.targets:
                continue
            generator = torch.Generator().manual_seed(_seed(seed, adapter, self.hf_name(part)))
            bound = 1 / math.sqrt(in_full)  # kaiming_uniform_(a=sqrt(5)), as peft initialises A
            a_full = torch.empty(settings.rank, in_full).uniform_(-bound, bound, generator=generator)
            a = a_full.chunk(self.tp_size, dim=1)[self.tp_rank] if self.kind == 'row' else a_full
            b = torch.zeros(rows if self.kind == 'column' else weight.shape[0], settings.rank)
            a_params[part] = nn.Parameter(a.to(device=weight.device, dtype=torch.float32).contiguous())
            b_params[part] = nn.Parameter(b.to(device=weight.device, dtype=torch.float32))
            self._mark(a_params[part], b_params[part])
        if not len(a_params):
            return []
        self.lora_A[adapter], self.lora_B[adapter] = a_params, b_params
        self.dropouts[adapter] = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        self.settings[adapter] = settings
        return list(a_params.values()) + list(b_params.values())

    def _mark(self, a: nn.Parameter, b: nn.Parameter) -> None:
        """Megatron's attributes: which factor is split (counted by its shards in the norm), which sees
        only this rank's tokens (its gradient summed over tp)."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
        split, whole = (b, a) if self.kind == 'column' else (a, b)
        set_tensor_model_parallel_attributes(split, is_parallel=self.tp_size > 1, dim=0 if self.kind == 'column'
                                             else 1, stride=1)
        if self.sequence_parallel:
            whole.sequence_parallel = True

    def forward(self, x: torch.Tensor, *args, **kwargs):
        output, bias = self.base_layer(x, *args, **kwargs)
        adapter = self.active
        if adapter is None or adapter not in self.lora_A:
            return output, bias
        from megatron.core import tensor_parallel as tpl
        a_params, b_params = self.lora_A[adapter], self.lora_B[adapter]
        parts = [part for part in self.parts if part in a_params]
        dtype = a_params[parts[0]].dtype
        x = self.dropouts[adapter](x).to(dtype)
        low = x @ torch.cat([a_params[part] for part in parts]).t()  # [s, b, parts * r]
        if self.kind == 'column':
            low = (tpl.gather_from_sequence_parallel_region(low) if self.sequence_parallel
                   else tpl.copy_to_tensor_model_parallel_region(low) if self.tp_size > 1 else low)
        else:
            low = (tpl.reduce_scatter_to_sequence_parallel_region(low) if self.sequence_parallel
                   else tpl.reduce_from_tensor_model_parallel_region(low) if self.tp_size > 1 else low)
        scale = self.settings[adapter].scale
        updates = dict(zip(parts, (chunk @ b_params[part].t() * scale
                                   for chunk, part in zip(low.chunk(len(parts), dim=-1), parts))))
        if self.kind == 'row':
            return output + updates[parts[0]].to(output.dtype), bias
        rows = low.shape[:-1]
        full = [updates.get(part, low.new_zeros(*rows, size)) for part, size in zip(self.parts, self.part_sizes)]
        return output + self.layout(full).to(output.dtype), bias

    def local_state(self, adapter: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{hf name: (A, B)} of this rank's slices."""
        if adapter not in self.lora_A:
            return {}
        return {self.hf_name(part): (self.lora_A[adapter][part].detach().cpu(),
                                     self.lora_B[adapter][part].detach().cpu()) for part in self.lora_A[adapter]}

    def load_full(self, adapter: str, weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Whole HF-shaped (A, B) per hf name into this rank's slices."""
        for part in self.lora_A[adapter] if adapter in self.lora_A else ():
            a, b = weights[self.hf_name(part)]
            if self.kind == 'row':
                a = a.chunk(self.tp_size, dim=1)[self.tp_rank]
            else:
                b = b.chunk(self.tp_size, dim=0)[self.tp_rank]
            with torch.no_grad():
                self.lora_A[adapter][part].copy_(a)
                self.lora_B[adapter][part].copy_(b)


def merge_tp(kind: str, slices: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole (A, B) of one HF projection from its tp ranks' slices (in tp order)."""
    if kind == 'row':
        return torch.cat([a for a, _ in slices], dim=1), slices[0][1]
    return slices[0][0], torch.cat([b for _, b in slices], dim=0)


def wrap_linears(model: nn.Module, *, num_heads: int, num_kv_heads: int, head_dim: int, layer_offset: int,
                 tp_size: int, tp_rank: int, sequence_parallel: bool) -> List[LoraParallelLinear]:
    """Replace the decoder's attention and dense MLP linears by LoRA wrappers (no adapter yet)."""
    groups = num_kv_heads // tp_size
    per_group = num_heads // num_kv_heads * head_dim
    sizes = {'self_attention.linear_qkv': (groups * per_group, groups * head_dim, groups * head_dim)}

    def grouped_qkv(parts: List[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        lead = q.shape[:-1]
        return torch.cat([q.reshape(*lead, groups, per_group), k.reshape(*lead, groups, head_dim),
                          v.reshape(*lead, groups, head_dim)], dim=-1).reshape(*lead, -1)

    wrappers = []
    for index, layer in enumerate(model.decoder.layers):
        for path, (parts, kind, hf_module) in FUSED.items():
            owner_name, attr = path.split('.')
            owner = getattr(layer, owner_name, None)
            base = getattr(owner, attr, None)
            if base is None:  # an MoE layer has no dense linear_fc1/fc2
                continue
            if path == 'mlp.linear_fc1':
                half = base.weight.shape[0] // 2
                part_sizes, layout = (half, half), (lambda pieces: torch.cat(pieces, dim=-1))
            elif path == 'self_attention.linear_qkv':
                part_sizes, layout = sizes[path], grouped_qkv
            else:
                part_sizes, layout = (base.weight.shape[0],), None
            wrapper = LoraParallelLinear(base, kind=kind, hf_prefix=f'model.layers.{layer_offset + index}.{hf_module}',
                                         parts=parts, part_sizes=part_sizes, layout=layout,
                                         sequence_parallel=sequence_parallel, tp_size=tp_size, tp_rank=tp_rank)
            setattr(owner, attr, wrapper)
            wrappers.append(wrapper)
    return wrappers


def _seed(seed: int, adapter: str, name: str) -> int:
    digest = hashlib.sha256(f'{seed}/{adapter}/{name}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)
