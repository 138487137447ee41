"""One worker thread runs every model call, taking tenants in turn: fair, bounded, never unbounded.

The base model serves one call at a time (one active adapter), so calls are queued per tenant and
the worker takes the next call of the next tenant with work (round robin): a tenant that sends a
hundred requests delays another tenant's one request by at most one call per tenant ahead of it.
Each tenant's queue holds at most ``max_queued`` calls; one more is refused at once (``QueueFull``,
HTTP 429) instead of growing memory. A caller waits for its call at most ``timeout`` seconds.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable, Deque, Dict, Tuple

from twinkle.utils.logger import get_logger

logger = get_logger(__name__)


class QueueFull(RuntimeError):
    """The tenant already has ``max_queued`` calls waiting."""


class FairExecutor:
    def __init__(self, max_queued: int, name: str = 'twinkle-model'):
        if not isinstance(max_queued, int) or max_queued < 1:
            raise ValueError(f'max_queued must be a positive int, got {max_queued!r}')
        self.max_queued = max_queued
        self._queues: Dict[str, Deque[Tuple[Callable[[], Any], concurrent.futures.Future]]] = {}
        self._turns: Deque[str] = collections.deque()  # tenants with queued calls, in serving order
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, tenant: str, call: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._ready:
            if self._closed:
                raise RuntimeError('the executor is shut down')
            queue = self._queues.setdefault(tenant, collections.deque())
            if len(queue) >= self.max_queued:
                raise QueueFull(f'tenant {tenant!r} already has {len(queue)} requests queued (max_queued='
                                f'{self.max_queued}); retry when one has finished')
            queue.append((call, future))
            if tenant not in self._turns:
                self._turns.append(tenant)
            self._ready.notify()
        return future

    def run(self, tenant: str, call: Callable[[], Any], timeout: float) -> Any:
        """Submit and wait at most ``timeout`` seconds (``TimeoutError`` names the wait)."""
        future = self.submit(tenant, call)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f'the model did not run this request within {timeout:g} s (request_timeout)') from None

    def queued(self, tenant: str) -> int:
        with self._ready:
            return len(self._queues.get(tenant, ()))

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)

    def _next(self):
        with self._ready:
            while not self._turns and not self._closed:
                self._ready.wait()
            if not self._turns:
                return None
            tenant = self._turns.popleft()
            queue = self._queues[tenant]
            item = queue.popleft()
            if queue:
                self._turns.append(tenant)  # its next call waits for every other tenant's turn
            return item

    def _serve(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as error:  # the caller gets it; the worker keeps serving
                future.set_exception(error)
