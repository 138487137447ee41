"""The transport interface between the sender (model) and the receivers (samplers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

NamedTensors = Iterable[Tuple[str, torch.Tensor]]


class SyncTimeout(RuntimeError):
    """A weight-sync peer did not answer in time: it stalled, died, or never joined."""


@dataclass
class WeightBatch:
    """What one sync carries: how to read the weights (``meta``: adapter name, peft config,
    merged or not) and the named tensors themselves, streamed."""

    meta: Dict[str, Any]
    weights: Iterator[Tuple[str, torch.Tensor]] = field(repr=False)


class CheckpointEngine:
    """Moves one ``WeightBatch`` from the sender to every receiver.

    The sender calls ``send(meta, weights)``; each receiver calls ``receive()`` and consumes the
    returned batch's ``weights`` before the next ``receive``. ``is_sender`` tells which side this
    process is."""

    is_sender: bool = True

    def send(self, meta: Dict[str, Any], weights: NamedTensors) -> None:
        raise NotImplementedError

    def receive(self) -> WeightBatch:
        raise NotImplementedError

    def close(self) -> None:
        """Release the transport (a no-op where nothing is held)."""


class InProcessCheckpointEngine(CheckpointEngine):
    """Model and sampler in one process: the batch is handed over as it is streamed, one tensor
    at a time, never collected."""

    def __init__(self):
        self._pending: List[WeightBatch] = []

    def send(self, meta: Dict[str, Any], weights: NamedTensors) -> None:
        self._pending.append(WeightBatch(dict(meta), iter(weights)))

    def receive(self) -> WeightBatch:
        if not self._pending:
            raise RuntimeError('InProcessCheckpointEngine.receive: nothing was sent')
        return self._pending.pop(0)


def check_timeout(timeout: Optional[float]) -> float:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float('inf'):
        raise ValueError(f'timeout must be a positive, finite number of seconds, got {timeout!r}')
    return float(timeout)
