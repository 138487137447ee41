"""Model adapters: the training API over a framework's model, kernels chosen at load time."""
from .base import TwinkleModel
from .transformers import TransformersModel

__all__ = ['TransformersModel', 'TwinkleModel']
