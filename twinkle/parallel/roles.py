"""One torchrun job, several worlds: e.g. RL's trainer ranks and sampler ranks.

``split_torchrun({'model': 2, 'sampler': 1})`` hands out torchrun's ranks in that order and
rewrites this process's RANK / WORLD_SIZE / MASTER_PORT to its role's own world before
``twinkle.initialize`` runs, so the model's mesh and collectives span the model's ranks only (a
sampler never enters an FSDP all-gather). The roles talk over standalone channels that bound every
wait: ``ProcessGroupCheckpointEngine`` for weights, ``ObjectChannel`` for rollouts. Ports: the
role worlds take MASTER_PORT + 1.., the channels ``Role.port(k)`` above those.
"""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Dict

import torch.distributed as dist


class ChannelTimeout(RuntimeError):
    """A peer role did not put an object within the channel's timeout."""


@dataclass(frozen=True)
class Role:
    name: str
    rank: int  # within the role
    size: int
    job_rank: int  # torchrun's RANK
    job_size: int
    host: str
    base_port: int  # torchrun's MASTER_PORT
    roles: int

    def port(self, channel: int) -> int:
        """A port for the ``channel``-th channel between roles, above the role worlds' ports."""
        return self.base_port + self.roles + 1 + channel


def split_torchrun(sizes: Dict[str, int]) -> Role:
    """This process's role; call before ``twinkle.initialize`` (it reads the rewritten environment)."""
    if not sizes or any(not isinstance(size, int) or size < 1 for size in sizes.values()):
        raise ValueError(f'sizes must map role names to positive ints, got {sizes!r}')
    missing = [name for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if name not in os.environ]
    if missing:
        raise RuntimeError(f'split_torchrun needs the torchrun environment; {", ".join(missing)} not set '
                           f'(launch with torchrun --nproc_per_node={sum(sizes.values())})')
    if dist.is_initialized():
        raise RuntimeError('split_torchrun must run before twinkle.initialize (the process group exists already)')
    job_rank, job_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if sum(sizes.values()) != job_size:
        raise ValueError(f'the roles {sizes} need {sum(sizes.values())} ranks but torchrun started WORLD_SIZE='
                         f'{job_size}')
    base_port, start = int(os.environ['MASTER_PORT']), 0
    for index, (name, size) in enumerate(sizes.items()):
        if job_rank < start + size:
            # the role's rank 0 hosts its world's store (torchrun's agent store serves the whole job only)
            os.environ.update(RANK=str(job_rank - start), WORLD_SIZE=str(size), MASTER_PORT=str(base_port + 1 + index),
                              TORCHELASTIC_USE_AGENT_STORE='False')
            return Role(name, job_rank - start, size, job_rank, job_size, os.environ['MASTER_ADDR'], base_port,
                        len(sizes))
        start += size
    raise AssertionError('unreachable: the sizes sum to WORLD_SIZE')


class ObjectChannel:
    """Picklable objects between processes through a TCP store, each ``get`` bounded by ``timeout``.

    Keys are written once: ``put(key, obj, readers=n)``; each of the n readers ``get``s it once and
    the last one deletes it, so the store holds only what some reader still has to take.
    """

    def __init__(self, host: str, port: int, *, is_host: bool, world_size: int, timeout: float = 300.0):
        self.timeout = datetime.timedelta(seconds=timeout)
        self._where = f'object channel {host}:{port}'
        try:  # the host waits for all world_size processes to join
            self._store = dist.TCPStore(host, port, world_size, is_master=is_host, timeout=self.timeout)
        except RuntimeError as error:
            raise ChannelTimeout(f'{self._where}: {world_size} processes did not all join within '
                                 f'{self.timeout.total_seconds():g} s ({error})') from error

    def put(self, key: str, value: Any, readers: int = 1) -> None:
        if not isinstance(readers, int) or readers < 1:
            raise ValueError(f'readers must be a positive int, got {readers!r}')
        self._store.set(key, pickle.dumps((readers, value)))

    def get(self, key: str) -> Any:
        try:
            self._store.wait([key], self.timeout)
        except RuntimeError as error:
            raise ChannelTimeout(f'{self._where}: nothing put under {key!r} within '
                                 f'{self.timeout.total_seconds():g} s (the peer stalled or died: {error})') from error
        readers, value = pickle.loads(self._store.get(key))
        if self._store.add(f'{key}/reads', 1) == readers:
            self._store.delete_key(key)
            self._store.delete_key(f'{key}/reads')
        return value
