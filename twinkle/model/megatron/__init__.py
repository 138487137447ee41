"""MegatronModel and its foundation over megatron-core (the optional ``megatron`` extra).

Nothing here imports megatron-core at import time: ``require_megatron()`` does, inside the
functions that need it, so ``import twinkle.model`` works without the extra installed.
"""
import importlib

# name -> submodule that defines it, imported on first access.
_LAZY_EXPORTS = {
    'MegatronModel': 'model',
    'apply_cpu_shim': 'cpu_shim',
    'applied_patches': 'cpu_shim',
    'initialize_megatron_groups': 'parallel_state',
    'destroy_megatron_groups': 'parallel_state',
}


def require_megatron():
    """``megatron.core``, or one ImportError that names the extra to install."""
    try:
        import megatron.core
    except ImportError as error:
        raise ImportError("MegatronModel needs megatron-core: pip install 'twinkle[megatron]'") from error
    return megatron.core


def __getattr__(name):
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'.{_LAZY_EXPORTS[name]}', __name__), name)


__all__ = ['require_megatron', *_LAZY_EXPORTS]
