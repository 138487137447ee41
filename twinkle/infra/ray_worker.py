"""The process behind one rank of a Ray group: it joins its group's process group and holds the
components built there.

Ray starts it with the torchrun-style environment of its rank (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TWINKLE_DEVICE) already set, so everything twinkle
reads at import sees the same world a torchrun rank would. Kept free of ``import ray``: Ray wraps
the class in ``ray.remote`` where the actors are created.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable, Dict, Iterator, Tuple


class RankWorker:
    def __init__(self, group: str, init: dict):
        self.group, self.init = group, init
        self.components: Dict[int, Any] = {}
        self.iterators: Dict[int, Iterator] = {}

    def setup(self, mesh) -> int:
        """Join the group's process group with ``mesh`` as the global mesh (every rank of the group
        calls this at once); returns this process's pid."""
        import twinkle
        from twinkle.utils.process_state import RAY_WORKER, process_state
        process_state().role = RAY_WORKER
        twinkle.initialize(mode='local', global_device_mesh=mesh, **self.init)
        return os.getpid()

    def build(self, handle: int, cls: type, args: tuple, kwargs: dict) -> None:
        self.components[handle] = cls(*args, **kwargs)

    def call(self, handle: int, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.components[handle], method)(*args, **kwargs)

    def apply(self, handle: int, function: Callable, args: tuple, kwargs: dict) -> Any:
        """``function(component, *args, **kwargs)``: work that needs the component but is no method
        of it (the weight sync between two groups)."""
        return function(self.components[handle], *args, **kwargs)

    def next_item(self, handle: int, restart: bool) -> Tuple[bool, Any]:
        """(False, item) or (True, None) once the component's iterator is exhausted."""
        if restart or handle not in self.iterators:
            self.iterators[handle] = iter(self.components[handle])
        try:
            return False, next(self.iterators[handle])
        except StopIteration:
            del self.iterators[handle]
            return True, None

    def release(self, handle: int) -> None:
        self.components.pop(handle, None)
        self.iterators.pop(handle, None)


def free_endpoint() -> Tuple[str, int]:
    """This node's address and a port free on it (run on a group's first bundle: its MASTER_ADDR/PORT)."""
    import ray
    with socket.socket() as probe:
        probe.bind(('', 0))
        port = probe.getsockname()[1]
    return ray.util.get_node_ip_address(), port
