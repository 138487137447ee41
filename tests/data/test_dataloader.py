"""DataLoader: per-rank slices are disjoint and cover the epoch, len(), shuffling, exact resume."""
from types import SimpleNamespace

import pytest

from twinkle.dataloader import DataLoader


class Rows:
    """A map-style dataset whose rows name themselves."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return {'id': index}


class Stream:
    """An iterable dataset (no len)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return ({'id': i} for i in range(self.n))


def mesh(rank, world_size):
    return SimpleNamespace(data_rank=rank, data_world_size=world_size)


def ids(batch):
    return [row['id'] for row in batch]


def epoch_per_rank(dataset, world_size, **kwargs):
    """Every rank's batches of one epoch, as lists of ids."""
    return [[ids(b) for b in DataLoader(dataset, device_mesh=mesh(r, world_size), **kwargs)] for r in range(world_size)]


@pytest.mark.parametrize('world_size', [2, 4])
@pytest.mark.parametrize('dataset', [Rows(30), Stream(30)], ids=['map-style', 'iterable'])
def test_rank_slices_are_disjoint_and_cover_the_epoch(world_size, dataset):
    per_rank = epoch_per_rank(dataset, world_size, batch_size=8)
    steps = len(per_rank[0])
    assert all(len(batches) == steps == 4 for batches in per_rank)  # 3 full global batches + 6 left
    for step in range(steps):
        global_batch = [i for batches in per_rank for i in batches[step]]
        assert len(global_batch) == len(set(global_batch)) == (8 if step < 3 else 6)
    seen = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert seen == list(range(30))
    if world_size == 4:  # the short last batch splits 2, 2, 1, 1
        assert [len(batches[-1]) for batches in per_rank] == [2, 2, 1, 1]


def test_len_and_min_batch_size():
    assert len(DataLoader(Rows(30), batch_size=8)) == 4
    assert len(DataLoader(Rows(30), batch_size=8, min_batch_size=8)) == 3
    assert len(DataLoader(Rows(32), batch_size=8, min_batch_size=8)) == 4
    assert [len(b) for b in DataLoader(Rows(30), batch_size=8, min_batch_size=8)] == [8, 8, 8]
    # by default every rank must get a sample: 2 left over for 4 ranks are dropped
    assert len(epoch_per_rank(Rows(26), 4, batch_size=8)[0]) == 3
    with pytest.raises(TypeError, match='no length'):
        len(DataLoader(Stream(5), batch_size=2))


def test_shuffle_is_seeded_per_epoch():
    loader = DataLoader(Rows(20), batch_size=5, seed=3)
    first, second = [sum(map(ids, loader), []) for _ in range(2)]
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    assert sum(map(ids, DataLoader(Rows(20), batch_size=5, seed=3)), []) == first
    assert sum(map(ids, DataLoader(Rows(20), batch_size=5, shuffle=False)), []) == list(range(20))
    assert sum(map(ids, DataLoader(Stream(7), batch_size=5)), []) == list(range(7))  # streams keep order


@pytest.mark.parametrize('dataset', [Rows(23), Stream(23)], ids=['map-style', 'iterable'])
def test_resume_skips_exactly_the_consumed_samples(dataset):
    uninterrupted = DataLoader(dataset, batch_size=4, device_mesh=mesh(1, 2))
    expected = [ids(b) for _ in range(2) for b in uninterrupted]  # two epochs
    interrupted = DataLoader(dataset, batch_size=4, device_mesh=mesh(1, 2))
    taken = []
    for batch in interrupted:
        taken.append(ids(batch))
        if len(taken) == 3:
            break
    state = interrupted.state_dict()
    assert state['epoch'] == 0 and state['consumed_samples'] == 12
    resumed = DataLoader(dataset, batch_size=4, device_mesh=mesh(1, 2))
    resumed.load_state_dict(state)
    taken += [ids(b) for b in resumed]
    assert resumed.state_dict()['epoch'] == 1
    taken += [ids(b) for b in resumed]
    assert taken == expected


@pytest.mark.parametrize('samples, kwargs', [(0, {}), (3, dict(min_batch_size=4))])
def test_a_loader_without_a_batch_is_refused(samples, kwargs):
    with pytest.raises(ValueError, match=f'has {samples} samples, fewer than min_batch_size'):
        DataLoader(Rows(samples), batch_size=4, **kwargs)


def test_a_dropped_tail_is_logged(twinkle_logs):
    assert len(DataLoader(Rows(10), batch_size=4, min_batch_size=3)) == 2
    assert 'the last 2 of 10 samples of each epoch are dropped' in twinkle_logs.text


@pytest.mark.parametrize('state, message', [
    ({'epoch': 0, 'consumed_samples': -8}, r"state\['consumed_samples'\] must be a non-negative int"),
    ({'epoch': 0, 'consumed_samples': 12}, 'consumed_samples..=12 is more than this dataset.s 8 samples'),
    ({'epoch': 0, 'consumed_samples': 4, 'num_samples': 16}, 'saved for a dataset of 16 samples, this one has 8'),
])
def test_a_state_of_another_dataset_is_refused(state, message):
    with pytest.raises(ValueError, match=message):
        DataLoader(Rows(8), batch_size=4).load_state_dict(state)


def test_dataset_factory():
    assert len(DataLoader(lambda: Rows(9), batch_size=3)) == 3


@pytest.mark.parametrize('kwargs, message', [
    (dict(batch_size=6, device_mesh=mesh(0, 4)), 'batch_size must be a positive multiple of the data world size 4'),
    (dict(batch_size=0), 'batch_size must be a positive multiple'),
    (dict(batch_size=4, min_batch_size=5), r'min_batch_size must be an int in \[1, batch_size=4\]'),
    (dict(batch_size=4, device_mesh=object()), 'device_mesh must have data_rank and data_world_size'),
    (dict(batch_size=4, device_mesh=mesh(2, 2)), 'data_rank 2 is outside'),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataLoader(Rows(10), **kwargs)


def test_shuffling_a_stream_and_mismatched_state_are_refused():
    with pytest.raises(ValueError, match='shuffle=True needs a map-style dataset'):
        DataLoader(Stream(4), batch_size=2, shuffle=True)
    loader = DataLoader(Rows(4), batch_size=2, seed=1)
    with pytest.raises(ValueError, match='saved with seed 2'):
        loader.load_state_dict({'epoch': 0, 'consumed_samples': 2, 'seed': 2})
    with pytest.raises(ValueError, match='missing'):
        loader.load_state_dict({'epoch': 0})
