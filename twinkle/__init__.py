"""Twinkle: backend-abstracted kernels and parallelism for training large language models."""
from .utils.logger import get_logger
from .runtime import initialize
from .parallel.mesh import DeviceGroup, DeviceMesh, get_device_placement

__version__ = '0.1.0'

__all__ = ['DeviceGroup', 'DeviceMesh', 'get_device_placement', 'get_logger', 'initialize', '__version__']
