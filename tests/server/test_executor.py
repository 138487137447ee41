"""The model's worker thread: tenants in turn, bounded queues, bounded waits, failures kept per call."""
import threading

import pytest

from twinkle.server.executor import FairExecutor, QueueFull


def test_tenants_take_turns_and_a_full_queue_is_refused_at_once():
    executor = FairExecutor(max_queued=3)
    gate, order = threading.Event(), []
    blocker = executor.submit('x', gate.wait)  # holds the worker while the queues fill
    futures = [executor.submit(tenant, lambda t=tenant, i=i: order.append(f'{t}{i}'))
               for tenant, count in (('a', 3), ('b', 2), ('c', 1)) for i in range(count)]
    with pytest.raises(QueueFull, match=r"tenant 'a' already has 3 requests queued \(max_queued=3\)"):
        executor.submit('a', lambda: None)
    gate.set()
    for future in [blocker, *futures]:
        future.result(timeout=30)
    assert order == ['a0', 'b0', 'c0', 'a1', 'b1', 'a2']  # round robin, not first come first served
    executor.shutdown()


def test_a_failing_call_fails_only_its_caller_and_waits_are_bounded():
    executor = FairExecutor(max_queued=2)
    with pytest.raises(ZeroDivisionError):
        executor.run('a', lambda: 1 / 0, timeout=30)
    assert executor.run('b', lambda: 42, timeout=30) == 42
    gate = threading.Event()
    executor.submit('a', gate.wait)
    with pytest.raises(TimeoutError, match='within 0.2 s'):
        executor.run('b', lambda: None, timeout=0.2)
    gate.set()
    executor.shutdown()
    with pytest.raises(ValueError, match='max_queued'):
        FairExecutor(max_queued=0)
