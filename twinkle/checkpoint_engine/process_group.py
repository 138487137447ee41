"""Weights over a standalone process group: model rank 0 broadcasts buckets to the samplers.

The group is its own small world (sender = rank 0, samplers = ranks 1..N) joined through a TCP
store, not the training job's default group: model and samplers may each be a torch.distributed
world of their own (torchrun roles, Ray actor groups) and the sync must not enter their
collectives. Every wait -- joining, each bucket -- is bounded by ``timeout`` and fails as
``SyncTimeout`` naming the operation and the peers, instead of hanging (a stalled sampler is the
known failure of weight sync).

Wire format per bucket: an int64 header length, the pickled header (names, dtypes, shapes, the
batch's meta on the first bucket, ``done`` on the last), then one uint8 payload of the bucket's
tensors back to back. A bucket holds at most ``bucket_bytes`` (one larger tensor goes alone).
"""
from __future__ import annotations

import datetime
import pickle
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from twinkle.utils.logger import get_logger

from .base import CheckpointEngine, NamedTensors, SyncTimeout, WeightBatch, check_timeout

logger = get_logger(__name__)

DEFAULT_BUCKET_BYTES = 256 * 2**20


class ProcessGroupCheckpointEngine(CheckpointEngine):
    """One side of the sync group. ``rank`` 0 sends (the model's first rank), ranks 1..``world_size``-1
    receive (one per sampler rank); all of them pass the same ``host``/``port`` (rank 0 hosts the store)."""

    def __init__(self, *, rank: int, world_size: int, host: str = '127.0.0.1', port: int = 29600,
                 backend: str = 'gloo', device: Optional[torch.device] = None, timeout: float = 300.0,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if not isinstance(world_size, int) or world_size < 2:
            raise ValueError(f'world_size must be an int >= 2 (the sender and at least one sampler), got {world_size!r}')
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f'rank must be an int in [0, {world_size}), got {rank!r}')
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f'bucket_bytes must be a positive int, got {bucket_bytes!r}')
        self.rank, self.world_size, self.bucket_bytes = rank, world_size, bucket_bytes
        self.is_sender = rank == 0
        self.timeout = datetime.timedelta(seconds=check_timeout(timeout))
        self.device = torch.device('cpu') if device is None else torch.device(device)
        self._peers = f'sync group {host}:{port} (rank {rank} of {world_size}; rank 0 = the model, others samplers)'
        self._group = self._wait('joining', lambda: _new_group(backend, host, port, rank, world_size, self.timeout))
        self._syncs = 0

    def send(self, meta: Dict[str, Any], weights: NamedTensors) -> None:
        if not self.is_sender:
            raise RuntimeError(f'send: rank {self.rank} of the sync group receives; rank 0 sends')
        self._syncs += 1
        header: Dict[str, Any] = {'meta': dict(meta)}
        bucket: List[Tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in weights:
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                self._send_bucket(header, bucket, done=False)
                header, bucket, size = {}, [], 0
            bucket.append((name, tensor.detach()))
            size += nbytes
        self._send_bucket(header, bucket, done=True)

    def receive(self) -> WeightBatch:
        if self.is_sender:
            raise RuntimeError('receive: rank 0 of the sync group sends; ranks 1.. receive')
        self._syncs += 1
        header, tensors = self._receive_bucket()
        return WeightBatch(header['meta'], self._stream(header, tensors))

    def close(self) -> None:
        self._group = None

    # -- wire --------------------------------------------------------------------------------------
    def _stream(self, header, tensors) -> Iterator[Tuple[str, torch.Tensor]]:
        while True:
            yield from tensors
            if header['done']:
                return
            header, tensors = self._receive_bucket()

    def _send_bucket(self, header: Dict[str, Any], bucket, done: bool) -> None:
        header = dict(header, done=done, tensors=[(name, t.dtype, tuple(t.shape)) for name, t in bucket])
        encoded = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8)
        payload = (torch.cat([_as_bytes(t.to(self.device)) for _, t in bucket]) if bucket
                   else torch.empty(0, dtype=torch.uint8, device=self.device))
        lengths = torch.tensor([encoded.numel(), payload.numel()], dtype=torch.int64, device=self.device)
        what = f'sync {self._syncs}: {len(bucket)} tensors, {payload.numel()} bytes'
        for tensor in (lengths, encoded.to(self.device), payload):
            self._broadcast(tensor, what)

    def _receive_bucket(self):
        what = f'sync {self._syncs}: a bucket'
        lengths = torch.empty(2, dtype=torch.int64, device=self.device)
        self._broadcast(lengths, what)
        encoded = torch.empty(int(lengths[0]), dtype=torch.uint8, device=self.device)
        self._broadcast(encoded, what)
        payload = torch.empty(int(lengths[1]), dtype=torch.uint8, device=self.device)
        self._broadcast(payload, what)
        header = pickle.loads(encoded.cpu().numpy().tobytes())
        tensors, offset = [], 0
        for name, dtype, shape in header['tensors']:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            tensors.append((name, payload[offset:offset + nbytes].view(dtype).view(shape)))
            offset += nbytes
        return header, tensors

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._wait(what, lambda: self._group.broadcast([tensor], options).wait(self.timeout))

    def _wait(self, what: str, action):
        try:
            return action()
        except RuntimeError as error:
            raise SyncTimeout(f'weight sync failed while {what} on the {self._peers} within '
                              f'{self.timeout.total_seconds():g} s: a peer stalled, died or never joined '
                              f'({error})') from error


def _new_group(backend: str, host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta):
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == 'gloo':
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == 'nccl':
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    if backend == 'hccl':
        try:
            from torch_npu._C._distributed_c10d import ProcessGroupHCCL
        except ImportError as error:
            raise ImportError('backend="hccl" needs torch_npu: pip install "twinkle-kit[npu]"') from error
        options = ProcessGroupHCCL.Options()
        options._timeout = timeout
        return ProcessGroupHCCL(store, rank, world_size, options)
    raise ValueError(f"backend must be 'gloo', 'nccl' or 'hccl', got {backend!r}")


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
