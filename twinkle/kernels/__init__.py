"""Kernels with one public function per op and a registry choosing the backend per device.

    from twinkle import kernels
    y = kernels.rms_norm(x, weight)                  # best backend for x's device
    kernels.select('rms_norm')                       # Selection(backend=..., reason=...)
    kernels.configure(rms_norm='reference')          # force for the whole run
"""
from .registry import KernelUnavailableError, configure, ops, report, select
from .rms_norm import TwinkleRMSNorm, rms_norm
from .kernelize import kernelize  # noqa: E402  (after the ops it maps to)

__all__ = ['KernelUnavailableError', 'TwinkleRMSNorm', 'configure', 'kernelize', 'ops', 'report',
           'rms_norm', 'select']
