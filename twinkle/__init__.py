"""Twinkle: backend-abstracted kernels and parallelism for training large language models."""
from .utils.logger import get_logger
from .runtime import initialize

__version__ = '0.1.0'

__all__ = ['get_logger', 'initialize', '__version__']
