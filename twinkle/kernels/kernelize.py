"""Swap Hugging Face modules and functions for twinkle's kernels, by mapping or automatically.

A mapping key is either a module class (every module of exactly that type gets a new class that
puts the replacement's ``forward`` first, so ``isinstance`` checks and the state dict still hold)
or a dotted path ``pkg.module.attr`` (that attribute is set). A value is the replacement, a
``{device_type: replacement}`` dict (other devices are skipped), or a Hugging Face ``kernels``
hub reference ``"org/repo:LayerName"`` (loaded through the optional ``kernels`` package).

Function replacements (dotted paths, e.g. RoPE) are process-wide: they change the modeling module,
so every model of that family in the process uses them, as Liger's and HF's patching do.
Which classes the automatic mapping replaces comes from ``families.py``.
"""
from __future__ import annotations

import importlib
import types
from typing import Any, Callable, Dict, Optional, Union

from torch import nn

from twinkle import backends
from twinkle.utils.logger import get_logger

from . import families
from .causal_lm import TwinkleCausalLMLoss
from .moe import TwinkleMoeExperts
from .rms_norm import TwinkleRMSNorm
from .rope import apply_rotary_pos_emb
from .swiglu import TwinkleSwiGLUMLP
from .swiglu.module import is_silu

logger = get_logger(__name__)

MappingKey = Union[type, str]


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Hugging Face's signature (``unsqueeze_dim`` positional) over twinkle's RoPE op."""
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


# What replaces each role of a known family (``families.py`` says which class plays it), and the
# RoPE function replaced in the modeling module of a family whose classes the model contains.
REPLACEMENTS: Dict[str, type] = {'norm': TwinkleRMSNorm, 'mlp': TwinkleSwiGLUMLP, 'experts': TwinkleMoeExperts,
                                 'causal_lm': TwinkleCausalLMLoss}
ROPE_REPLACEMENT: Callable = hf_apply_rotary_pos_emb

_swapped_classes: Dict[tuple, type] = {}


def kernelize(model: nn.Module, mapping: Optional[Dict[MappingKey, Any]] = None) -> nn.Module:
    """Apply ``mapping`` (or the automatic one for known model families) to ``model`` in place."""
    if mapping is None:
        mapping = auto_mapping(model)
        if not mapping:
            logger.info('kernelize: no known module classes in %s; nothing replaced', type(model).__name__)
    device_type = _device_type(model)
    for key, value in mapping.items():
        replacement = _for_device(value, device_type)
        if replacement is None:
            logger.info('kernelize: %s skipped on %s (mapping has no entry for it)', _name(key), device_type)
            continue
        if isinstance(replacement, str):
            replacement = load_hub_layer(replacement)
        if isinstance(key, type):
            _replace_modules(model, key, replacement)
        elif isinstance(key, str):
            _set_attribute(key, replacement)
        else:
            raise TypeError(f'mapping keys must be module classes or dotted paths, got {key!r}')
    return model


def auto_mapping(model: nn.Module) -> Dict[MappingKey, Any]:
    """The automatic replacements for the module classes ``model`` contains.

    MLPs whose activation is not SiLU are left alone (the fused MLP computes SwiGLU), and so are MoE
    experts that are not SwiGLU with [gate; up] concatenated: a class with one such module is kept
    whole, since the replacement swaps every module of the class."""
    found: Dict[MappingKey, Any] = {}
    kept_experts = set()
    for module in model.modules():
        cls = type(module)
        replacement = REPLACEMENTS.get(families.role_of(cls))
        if replacement is TwinkleSwiGLUMLP and not is_silu(module.act_fn):
            logger.info('kernelize: %s kept (activation %s is not SiLU)', cls.__name__, module.act_fn)
            continue
        if replacement is TwinkleMoeExperts and cls not in kept_experts:
            mismatch = TwinkleMoeExperts.swiglu_mismatch(module)
            if mismatch:
                logger.info('kernelize: %s kept (not SwiGLU experts with [gate; up] concatenated: %s)',
                            cls.__name__, mismatch)
                kept_experts.add(cls)
        if replacement is not None:
            found[cls] = replacement
            rope_path = families.family_of(cls).rope_path
            if rope_path:
                found[rope_path] = ROPE_REPLACEMENT
    return {key: value for key, value in found.items() if key not in kept_experts}


def load_hub_layer(reference: str) -> Any:
    """``"org/repo:LayerName"`` -> the layer class from the Hugging Face ``kernels`` hub."""
    repo_id, sep, layer_name = reference.partition(':')
    if not sep or not repo_id or not layer_name:
        raise ValueError(f'hub kernel reference must look like "org/repo:LayerName", got {reference!r}')
    try:
        import kernels
    except ImportError as exc:
        raise ImportError(f'hub kernel {reference!r} needs the Hugging Face kernels package: '
                          f'pip install "twinkle[hub]"') from exc
    return getattr(kernels.get_kernel(repo_id).layers, layer_name)


def _replace_modules(model: nn.Module, cls: type, replacement: Any) -> None:
    count = 0
    for module in model.modules():
        if type(module) is not cls:
            continue
        if isinstance(replacement, type):
            module.__class__ = _combined_class(cls, replacement)
            if hasattr(module, 'after_replacing'):  # set-up a replacement needs once, outside any graph
                module.after_replacing()
        elif callable(replacement):
            module.forward = types.MethodType(replacement, module)
        else:
            raise TypeError(f'replacement for {cls.__name__} must be a module class or a forward function')
        count += 1
    logger.info('kernelize: %s -> %s (%d modules)', cls.__name__, _name(replacement), count)


def _combined_class(original: type, replacement: type) -> type:
    """A subclass of both, replacement first: its forward wins, isinstance(original) still holds.

    It keeps the original's name: Hugging Face writes ``type(model).__name__`` into the saved
    config's ``architectures``, and a checkpoint must load without twinkle."""
    if issubclass(original, replacement):
        return original
    key = (original, replacement)
    if key not in _swapped_classes:
        _swapped_classes[key] = type(original.__name__, (replacement, original),
                                     {'__module__': original.__module__, '__qualname__': original.__qualname__,
                                      'twinkle_replacement': replacement})
    return _swapped_classes[key]


def _set_attribute(path: str, value: Callable) -> None:
    module_path, _, attr = path.rpartition('.')
    if not module_path:
        raise ValueError(f'dotted path {path!r} must name a module attribute (pkg.module.attr)')
    owner = importlib.import_module(module_path)
    if not hasattr(owner, attr):
        raise ValueError(f'{module_path} has no attribute {attr!r} to replace')
    setattr(owner, attr, value)
    logger.info('kernelize: %s -> %s', path, _name(value))


def _for_device(value: Any, device_type: str) -> Any:
    if isinstance(value, dict):
        return value.get(device_type)
    return value


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else backends.current().torch_device_type
    return backends.get(device_type).type


def _name(obj: Any) -> str:
    return getattr(obj, '__name__', None) or str(obj)
