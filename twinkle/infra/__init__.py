"""Runtime modes beyond one process / torchrun: Ray (``twinkle.initialize(mode='ray')``)."""
from .errors import RemoteGroupError, RemoteTimeout

__all__ = ['RemoteGroupError', 'RemoteTimeout']
