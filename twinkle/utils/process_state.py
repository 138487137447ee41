"""The one object that holds what a process knows about the job it is part of.

A torchrun rank, a Ray driver and each Ray actor are different processes with different answers
to "which mesh, which device, which rank am I, is there a cluster": keeping them in one object
(instead of module globals scattered over the layers) lets each hold its own, and lets a test swap
in a fresh one (``use_process_state``) without leaking choices into the next test. It lives in
``twinkle.utils`` because every layer reads it, the device layer included.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

RAY_DRIVER, RAY_WORKER, LOCAL = 'ray-driver', 'ray-worker', 'local'


@dataclass
class ProcessState:
    """``role``: LOCAL (one process or a torchrun rank), RAY_DRIVER (holds proxies) or RAY_WORKER.
    ``rank`` / ``local_rank``: None reads RANK / LOCAL_RANK from the environment on each use
    (torchrun and Ray set them before the process imports twinkle)."""

    role: str = LOCAL
    mesh: Any = None                        # the DeviceMesh given to twinkle.initialize
    backend: Any = None                     # the detected device backend (twinkle.backends.current)
    collective_timeout: Optional[datetime.timedelta] = None
    cluster: Any = None                     # a Ray driver's cluster (twinkle.infra.ray_cluster.RayCluster)
    proxy_factory: Any = None               # (cls, remote_group, args, kwargs) -> proxy, in a Ray driver
    rank: Optional[int] = None
    local_rank: Optional[int] = None
    caches: Dict[str, dict] = field(default_factory=dict)

    def global_rank(self) -> int:
        return self.rank if self.rank is not None else int(os.environ.get('RANK', '0'))

    def device_index(self) -> int:
        return self.local_rank if self.local_rank is not None else int(os.environ.get('LOCAL_RANK', '0'))

    def cache(self, name: str) -> dict:
        """A dict owned by this process state (e.g. the kernel registry's choices)."""
        return self.caches.setdefault(name, {})


_state = ProcessState()


def process_state() -> ProcessState:
    return _state


@contextlib.contextmanager
def use_process_state(state: Optional[ProcessState] = None) -> Iterator[ProcessState]:
    """Run a block with ``state`` (default: a fresh one) as this process's state, then restore."""
    global _state
    previous, _state = _state, state if state is not None else ProcessState()
    try:
        yield _state
    finally:
        _state = previous
