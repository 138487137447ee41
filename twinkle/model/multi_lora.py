"""Many LoRA adapters on one base model, each trained as if it were alone: the server's tenant pool.

``TransformersModel`` already keeps one train state per adapter (optimizer, scheduler, loss,
gradient accumulation); the pool adds what sharing a base model between independent users needs:

- adapters come and go while the model serves (``add_adapter_to_model`` at any time,
  ``remove_adapter``), the base weights are never touched;
- each adapter has its own template and processor (its own padding), swapped in with it;
- each adapter has its own random stream: its LoRA initialisation is drawn from ``seed`` and its
  dropout from a generator state kept per adapter, so an adapter's numbers do not depend on which
  other adapters were created or trained in between (``run_as``).

Calls for different adapters must not interleave (one base model, one active adapter): the server
runs them one at a time (``twinkle.server.executor``).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

from twinkle.utils.logger import get_logger

from .transformers import TransformersModel

logger = get_logger(__name__)


class MultiLoraTransformersModel(TransformersModel):
    """A one-process ``TransformersModel`` whose adapters are independent tenants (see module doc)."""

    def __init__(self, model_id: Optional[str] = None, **kwargs):
        super().__init__(model_id, **kwargs)
        if self.distributed:
            raise NotImplementedError('MultiLoraTransformersModel serves from one process: adapters are added and '
                                      'removed while it runs, which FSDP2 sharding does not allow')
        self._rng: Dict[str, torch.Tensor] = {}
        self._templates: Dict[str, tuple] = {}

    def add_adapter_to_model(self, adapter_name: str, config, gradient_accumulation_steps: int = 1,
                             seed: int = 42) -> None:
        """Add ``adapter_name`` with its LoRA initialisation drawn from ``seed`` (not from the shared stream)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            super().add_adapter_to_model(adapter_name, config, gradient_accumulation_steps)
            self._rng[adapter_name] = torch.get_rng_state()
        self._templates[adapter_name] = (None, None)

    def remove_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's weights, optimizer and state; the base model and other adapters stay."""
        self._state(adapter_name)  # an unknown name raises, naming the known ones
        self.model.delete_adapter(adapter_name)
        for table in (self._states, self._rng, self._templates):
            table.pop(adapter_name, None)
        self._active = next(iter(self._states), '')
        logger.info('adapter %r removed; %d left', adapter_name, len(self._states))

    def adapters(self):
        return sorted(self._states)

    @contextlib.contextmanager
    def run_as(self, adapter_name: str) -> Iterator[None]:
        """Run a block for ``adapter_name``: its template, processor and random stream in place."""
        self._state(adapter_name)
        shared_rng = torch.get_rng_state()
        torch.set_rng_state(self._rng[adapter_name])
        self.template, self.processor = self._templates[adapter_name]
        try:
            yield
        finally:
            self._templates[adapter_name] = (self.template, self.processor)
            self._rng[adapter_name] = torch.get_rng_state()
            torch.set_rng_state(shared_rng)
