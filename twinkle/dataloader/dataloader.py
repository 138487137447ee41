"""DataLoader: global batches, each data-parallel rank reading only its own slice.

``batch_size`` is the GLOBAL batch: every step the epoch's next ``batch_size`` samples are split
into contiguous, disjoint slices, one per data-parallel rank, so all ranks together consume each
sample of the epoch once. The rank and the number of ranks come from ``device_mesh.data_rank``
and ``device_mesh.data_world_size`` (any object with those attributes); without a mesh the one
process reads whole batches.

The state is (epoch, samples consumed in it), identical on every rank, so ``state_dict`` from any
rank resumes all of them: the next batch is exactly the one that would have come next. The epoch's
order is a permutation seeded by ``seed + epoch``, reproduced on resume.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch

from twinkle.utils.logger import get_logger
from twinkle.utils.process_state import RAY_DRIVER, process_state
from twinkle.utils.remote import RemoteCapable

logger = get_logger(__name__)


class DataLoader(RemoteCapable):
    """Iterates lists of this rank's samples (feed them to an ``InputProcessor`` to get tensors).

    Args:
        dataset: a map-style dataset (``len`` and indexing), an iterable one (e.g. streaming), or
            a callable that builds one (so a remote worker can build its own).
        batch_size: global samples per step, a multiple of the data world size.
        min_batch_size: a last global batch smaller than this is dropped (default: the data world
            size, so every rank gets at least one sample).
        device_mesh: object with ``data_rank`` and ``data_world_size``; None means the mesh given to
            ``twinkle.initialize`` (one rank without it).
        shuffle: reshuffle each epoch (default: yes for map-style datasets; streams keep their order).
        seed: base of the per-epoch shuffle seed.

    In a Ray driver it yields whole global batches (the driver is no data rank: a model proxy cuts
    each batch into its data ranks' shares); with ``remote_group=`` it is built on that group's first
    rank, a ``dataset`` factory called there, and the driver iterates its global batches.
    """

    remote_on_first_rank_only = True

    @classmethod
    def remote_build_kwargs(cls, kwargs: dict) -> dict:
        return {**kwargs, 'device_mesh': WholeBatch()}

    def __init__(self, dataset: Union[Any, Callable[[], Any]], batch_size: int, min_batch_size: Optional[int] = None,
                 device_mesh: Any = None, shuffle: Optional[bool] = None, seed: int = 42,
                 remote_group: Optional[str] = None):
        self.dataset = _built(dataset)
        self.device_mesh = device_mesh
        self.rank, self.world_size = _data_coordinates(device_mesh)
        if not isinstance(batch_size, int) or batch_size < 1 or batch_size % self.world_size:
            raise ValueError(f'batch_size must be a positive multiple of the data world size '
                             f'{self.world_size}, got {batch_size!r}')
        min_batch_size = self.world_size if min_batch_size is None else min_batch_size
        if not isinstance(min_batch_size, int) or not 1 <= min_batch_size <= batch_size:
            raise ValueError(f'min_batch_size must be an int in [1, batch_size={batch_size}], got {min_batch_size!r}')
        self.sized = _has_length(self.dataset)
        if self.sized:
            _check_has_a_batch(len(self.dataset), batch_size, min_batch_size)
        if shuffle and not self.sized:
            raise ValueError('shuffle=True needs a map-style dataset; an iterable dataset keeps its order')
        self.shuffle = self.sized if shuffle is None else shuffle
        self.batch_size, self.min_batch_size, self.seed = batch_size, min_batch_size, seed
        self.epoch, self.consumed_samples = 0, 0

    def __len__(self) -> int:
        """Global batches (steps) per epoch, the same on every rank."""
        if not self.sized:
            raise TypeError('an iterable dataset has no length, so neither has its DataLoader')
        return self._steps(len(self.dataset))

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        """The rest of the current epoch (all of it unless resumed or interrupted)."""
        if self.sized:
            self._check_same_steps_on_every_rank()
        batches = self._sized_batches() if self.sized else self._streamed_batches()
        for global_batch in batches:
            if len(global_batch) < self.min_batch_size:
                break
            self.consumed_samples += len(global_batch)
            yield self._my_slice(global_batch)
        self.epoch, self.consumed_samples = self.epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        state = {'epoch': self.epoch, 'consumed_samples': self.consumed_samples, 'seed': self.seed,
                 'batch_size': self.batch_size}
        if self.sized:
            state['num_samples'] = len(self.dataset)  # resuming on another dataset is then refused
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume: the next batch starts right after the consumed samples of ``state``'s epoch.

        A state of another dataset would silently skip or repeat data, so it is refused: the
        dataset size must match (states saved before sizes were recorded: the consumed samples
        must fit in this dataset)."""
        missing = {'epoch', 'consumed_samples'} - set(state)
        if missing:
            raise ValueError(f'state is missing {sorted(missing)}')
        for key in ('epoch', 'consumed_samples'):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'state[{key!r}] must be a non-negative int, got {value!r}')
        if state.get('seed', self.seed) != self.seed:
            raise ValueError(f'state was saved with seed {state["seed"]}, this loader has seed {self.seed}')
        if self.sized:
            size = len(self.dataset)
            saved_size = state.get('num_samples')
            if saved_size is not None and saved_size != size:
                raise ValueError(f'state was saved for a dataset of {saved_size} samples, this one has {size}: '
                                 f'resume with the same dataset (or start a fresh DataLoader)')
            if state['consumed_samples'] > size:
                raise ValueError(f'state["consumed_samples"]={state["consumed_samples"]} is more than this '
                                 f'dataset\'s {size} samples: the state belongs to another dataset')
        self.epoch, self.consumed_samples = state['epoch'], state['consumed_samples']

    # -- internals ------------------------------------------------------------------------------
    def _steps(self, samples: int) -> int:
        """Global batches in ``samples`` samples (a short last one counts if >= min_batch_size)."""
        full, rest = divmod(samples, self.batch_size)
        return full + int(0 < rest and rest >= self.min_batch_size)

    def _check_same_steps_on_every_rank(self) -> None:
        """Every rank must run the same number of steps, or their collectives pair up wrongly (gloo
        aborts with a "collective mismatch", NCCL hangs). Ranks that loaded datasets of different
        sizes are caught here, once per epoch, before the first step."""
        import torch.distributed as dist
        if not dist.is_initialized() or dist.get_world_size() == 1 or isinstance(self.device_mesh, WholeBatch):
            return  # WholeBatch: the one reader of a Ray group, its other ranks take no part
        from twinkle.parallel import collective
        mine = (self._steps(len(self.dataset) - self.consumed_samples), len(self.dataset), self.consumed_samples)
        everyone: List[Any] = [None] * dist.get_world_size()
        with collective('dataloader_steps'):
            dist.all_gather_object(everyone, mine)
        if len({steps for steps, _, _ in everyone}) > 1:
            detail = '; '.join(f'rank {rank}: {steps} steps ({size} samples, {consumed} consumed)'
                               for rank, (steps, size, consumed) in enumerate(everyone))
            raise ValueError(f'ranks would run different numbers of steps this epoch ({detail}). Every rank must '
                             f'load the same dataset (the DataLoader gives each data rank its slice of every '
                             f'global batch) and resume from the same state')

    def _sized_batches(self) -> Iterator[List[Any]]:
        """Global batches as lists of dataset indices: reading only this rank's rows is cheap."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        for start in range(self.consumed_samples, n, self.batch_size):
            yield order[start:start + self.batch_size]

    def _streamed_batches(self) -> Iterator[List[Any]]:
        """Global batches of rows read from the stream, after skipping the consumed ones."""
        stream = iter(self.dataset)
        for _ in range(self.consumed_samples):
            next(stream, None)
        batch: List[Any] = []
        for row in stream:
            batch.append(row)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _my_slice(self, global_batch: List[Any]) -> List[Dict[str, Any]]:
        mine = data_share(global_batch, self.rank, self.world_size)
        return [self.dataset[i] for i in mine] if self.sized else mine


def data_share(items, rank: int, world_size: int):
    """Data rank ``rank``'s contiguous share of ``items``; shares differ by at most one (a short last
    batch). A Ray driver cuts a global batch for its actors with the same rule."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (rank < extra)]


def _check_has_a_batch(samples: int, batch_size: int, min_batch_size: int) -> None:
    """An epoch without a batch would train on nothing without a word; a dropped tail is said."""
    if samples < min_batch_size:
        raise ValueError(f'the dataset has {samples} samples, fewer than min_batch_size={min_batch_size}, so an '
                         f'epoch would have no batch; add data or lower min_batch_size (and batch_size)')
    rest = samples % batch_size
    if 0 < rest < min_batch_size:
        logger.warning('the last %d of %d samples of each epoch are dropped: fewer than min_batch_size=%d',
                       rest, samples, min_batch_size)


def _built(dataset: Any) -> Any:
    """A dataset, or what a factory function returns (datasets themselves are not plain callables)."""
    is_factory = callable(dataset) and not hasattr(dataset, '__getitem__') and not hasattr(dataset, '__iter__')
    return dataset() if is_factory else dataset


class WholeBatch:
    """The coordinates of a reader of whole global batches: one data rank of one."""
    data_rank, data_world_size = 0, 1


def _data_coordinates(device_mesh: Any):
    if process_state().role == RAY_DRIVER:
        return 0, 1
    if device_mesh is None:
        from twinkle.parallel import global_mesh
        device_mesh = global_mesh()  # the mesh twinkle.initialize() recorded, as the seeds' scripts expect
        if device_mesh is None:
            return 0, 1
    try:
        rank, world_size = int(device_mesh.data_rank), int(device_mesh.data_world_size)
    except AttributeError as error:
        raise ValueError('device_mesh must have data_rank and data_world_size') from error
    if not 0 <= rank < world_size:
        raise ValueError(f'device_mesh.data_rank {rank} is outside [0, data_world_size={world_size})')
    return rank, world_size


def _has_length(dataset: Any) -> bool:
    try:
        len(dataset)
    except TypeError:
        return False
    return True
