"""Errors of the runtime modes, and the one place that imports Ray."""
from __future__ import annotations


class RemoteGroupError(RuntimeError):
    """A rank of a Ray group failed or died; the message names the group, the rank and the call."""


class RemoteTimeout(TimeoutError):
    """A Ray group did not answer (or could not be placed) within its named timeout."""


def require_ray():
    try:
        import ray
    except ImportError as error:
        raise ImportError("twinkle.initialize(mode='ray') needs Ray: pip install 'twinkle[ray]'") from error
    return ray
