"""Which Hugging Face classes twinkle knows, per model family: the one place that knows them.

``kernelize`` reads it to decide what to replace (norms, MLPs, experts, the causal-LM head, RoPE);
``apply_expert_parallel`` reads it to find the experts it slices and feeds. A class is matched by
its ``module.qualname``, so nothing is imported to match and a kernelized class (which keeps its
Hugging Face name) still matches.

    families.role_of(type(module))     # 'norm' | 'mlp' | 'experts' | 'causal_lm' | None
    families.family_of(type(module))   # the ModelFamily, or None

A new family is one more entry in ``FAMILIES``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

ROLES = ('norm', 'mlp', 'experts', 'causal_lm')

# The fused 3-D expert weights of an experts class, experts on dim 0 (Qwen3-MoE's layout): what
# expert parallelism slices per rank.
EXPERT_PARAMETERS = ('gate_up_proj', 'down_proj')


@dataclass(frozen=True)
class ModelFamily:
    """One Hugging Face modeling module and the class name playing each role in it."""

    name: str
    modeling_module: str
    classes: Dict[str, str] = field(default_factory=dict)  # role -> class name
    rope_function: Optional[str] = 'apply_rotary_pos_emb'  # module-level function the attention calls

    def __post_init__(self):
        unknown = sorted(set(self.classes) - set(ROLES))
        if unknown:
            raise ValueError(f'{self.name}: classes has unknown roles {unknown}; valid: {", ".join(ROLES)}')

    @property
    def rope_path(self) -> Optional[str]:
        return f'{self.modeling_module}.{self.rope_function}' if self.rope_function else None


def hugging_face_family(name: str, prefix: str, *, experts: bool = False) -> ModelFamily:
    """A family named the way ``transformers.models.<name>.modeling_<name>`` names its classes."""
    classes = {'norm': f'{prefix}RMSNorm', 'mlp': f'{prefix}MLP', 'causal_lm': f'{prefix}ForCausalLM'}
    if experts:
        classes['experts'] = f'{prefix}Experts'
    return ModelFamily(name, f'transformers.models.{name}.modeling_{name}', classes)


FAMILIES: List[ModelFamily] = [
    hugging_face_family('llama', 'Llama'),
    hugging_face_family('qwen2', 'Qwen2'),
    hugging_face_family('qwen3', 'Qwen3'),
    hugging_face_family('qwen3_moe', 'Qwen3Moe', experts=True),
]


def role_of(cls: type) -> Optional[str]:
    """The role ``cls`` plays in a known family, or None."""
    found = _lookup(cls)
    return found[1] if found else None


def family_of(cls: type) -> Optional[ModelFamily]:
    """The known family ``cls`` belongs to (it plays a role there), or None."""
    found = _lookup(cls)
    return found[0] if found else None


def classes_playing(role: str) -> List[str]:
    """``module.qualname`` of every known class playing ``role`` (for messages)."""
    return [f'{family.modeling_module}.{family.classes[role]}' for family in FAMILIES if role in family.classes]


def _lookup(cls: type) -> Optional[Tuple[ModelFamily, str]]:
    # Read FAMILIES at each call (a few entries): a family added at run time counts everywhere.
    path = f'{cls.__module__}.{cls.__qualname__}'
    for family in FAMILIES:
        if path.startswith(family.modeling_module + '.'):
            for role, name in family.classes.items():
                if path == f'{family.modeling_module}.{name}':
                    return family, role
    return None


__all__ = ['EXPERT_PARAMETERS', 'FAMILIES', 'ROLES', 'ModelFamily', 'classes_playing', 'family_of',
           'hugging_face_family', 'role_of']
