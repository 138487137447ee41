"""Model adapters: the training API over a framework's model, kernels chosen at load time.

``MegatronModel`` is imported on first use: it needs the optional megatron-core.
"""
from .base import TwinkleModel
from .transformers import TransformersModel

__all__ = ['MegatronModel', 'TransformersModel', 'TwinkleModel']


def __getattr__(name):
    if name == 'MegatronModel':
        from .megatron import MegatronModel
        return MegatronModel
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
