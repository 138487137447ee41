"""Named collectives: a stalled or dead rank becomes one clear error instead of a silent hang.

The process-group timeout (``twinkle.initialize(timeout=...)``) bounds every collective; gloo,
NCCL and HCCL then raise a low-level error ("Timed out waiting 5000ms for recv ...") that names
neither the step nor the culprit. ``collective(name)`` marks, in the job's key-value store, which
named operation each rank entered last; when the operation fails it reads the other ranks' marks
and raises ``CollectiveTimeout`` naming the operation, this rank, and the ranks that never got there.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, List, Optional, Union

import torch
import torch.distributed as dist

from twinkle import backends

_MARK_PREFIX = 'twinkle/last_collective/'
_FAILURE_HINTS = ('timed out', 'timeout', 'connection closed', 'connection reset', 'broken pipe')
_entered: Counter = Counter()


class CollectiveTimeout(RuntimeError):
    """A named collective did not complete: a peer stalled, died or took another code path."""


@contextlib.contextmanager
def collective(operation: str) -> Iterator[None]:
    """Run distributed work under a name; its communication failures raise ``CollectiveTimeout``.

    Errors that are not communication failures (shapes, OOM, ...) pass through unchanged.
    """
    if not dist.is_initialized():
        yield
        return
    _entered[operation] += 1
    mark = f'{operation} #{_entered[operation]}'
    store = _store()
    _safely(lambda: store.set(f'{_MARK_PREFIX}{dist.get_rank()}', mark))
    try:
        yield
    except CollectiveTimeout:
        raise
    except RuntimeError as error:
        if not _is_communication_failure(error):
            raise
        raise CollectiveTimeout(_explain(operation, mark, store, error)) from error


def all_reduce_sum(value: Union[int, float, torch.Tensor], group=None) -> torch.Tensor:
    """``value`` summed over the ranks of ``group`` (default: all), e.g. the global token count.

    Returns a new tensor on this rank's device; a single process gets ``value`` back as a tensor.
    """
    total = torch.as_tensor(value).detach().clone()
    if not dist.is_initialized():
        return total
    total = total.to(backends.current().local_device())
    with collective('all_reduce_sum'):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def _store():
    from torch.distributed.distributed_c10d import _get_default_store
    return _get_default_store()


def _is_communication_failure(error: RuntimeError) -> bool:
    if isinstance(error, dist.DistError):
        return True
    message = str(error).lower()
    return any(hint in message for hint in _FAILURE_HINTS)


def _explain(operation: str, mark: str, store, error: RuntimeError) -> str:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    behind: List[str] = []
    for peer in range(world_size):
        if peer == rank:
            continue
        peer_mark = _safely(lambda: _read_mark(store, peer))
        if peer_mark != mark:
            where = f'last entered {peer_mark!r}' if peer_mark else 'never entered a named collective'
            behind.append(f'rank {peer} {where}')
    culprit = ('; '.join(behind) if behind else
               'every rank entered it, so a peer died or hangs inside it')
    return (f'collective {operation!r} ({mark}) failed on rank {rank} of {world_size}: {culprit}. '
            f'Underlying error: {error}. The limit is twinkle.initialize(timeout=...).')


def _read_mark(store, peer: int) -> Optional[str]:
    key = f'{_MARK_PREFIX}{peer}'
    return store.get(key).decode() if store.check([key]) else None


def _safely(action):
    """Store calls are diagnostics: a store that is gone too must not hide the original error."""
    try:
        return action()
    except Exception:  # noqa: BLE001 - any store failure means "unknown"
        return None
