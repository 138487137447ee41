"""Small components for the Ray-mode tests (sent to the actors by value: tests/ is no package there)."""
import os
import time

import torch.distributed as dist

from twinkle.utils.remote import RemoteCapable, remote_method


class Probe(RemoteCapable):
    """Answers with what its rank sees: environment, process group, the share of data it got."""

    def __init__(self, tag='probe', device_mesh=None, remote_group=None):
        self.tag, self.device_mesh = tag, device_mesh

    def where(self):
        return {key: os.environ.get(key) for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE',
                                                     'MASTER_ADDR', 'MASTER_PORT', 'TWINKLE_DEVICE')} | {
            'pid': os.getpid(), 'dist_rank': dist.get_rank(), 'dist_world': dist.get_world_size()}

    @remote_method('slice', 'concat', sliced=('items',))
    def echo(self, items, suffix=''):
        return [f'{item}{suffix}@{dist.get_rank()}' for item in items]

    @remote_method('slice', 'mean_loss', sliced=('tokens',))
    def loss_of(self, tokens):
        return {'loss': float(sum(tokens)) / len(tokens), 'num_tokens': len(tokens)}

    def total(self, value):
        """A collective: every rank must take part."""
        import torch
        tensor = torch.tensor([float(value)])
        dist.all_reduce(tensor)
        return float(tensor)

    def fail(self, message):
        raise ValueError(message)

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds
