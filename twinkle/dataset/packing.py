"""Packing: several encoded samples per row, filling rows up to ``max_length`` tokens.

Padding a batch to its longest sample wastes compute on pad tokens; a length-skewed dataset
wastes most of it. Packing concatenates samples into rows of at most ``max_length`` tokens
(bin packing, best-fit decreasing), and position_ids restart at 0 for every sample, which is
how the model layer (``twinkle_varlen`` attention, ``InputProcessor(padding_free=True)``) knows
where one sample ends: attention never crosses a sample boundary, so a packed row trains
exactly like its samples would one by one.

``pack_lengths`` is plain best-fit decreasing in O(n log n): the ``binpacking`` package (worst-fit,
O(n * bins)) took 37 s for 20k samples.
"""
from __future__ import annotations

import bisect
from typing import Any, Dict, Iterator, List, Optional, Sequence

from twinkle.template import rows_of

from .base import Dataset


def pack_lengths(lengths: Sequence[int], max_length: int) -> List[List[int]]:
    """Group sample indices into bins whose lengths sum to at most ``max_length``.

    Best-fit decreasing: longest sample first, each into the fullest bin that still has room.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f'max_length must be a positive int, got {max_length!r}')
    bins: List[List[int]] = []
    room_left: List[tuple] = []  # sorted (room, bin) of bins that are not full
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > max_length:
            raise ValueError(f'sample {index} has {length} tokens, more than max_length={max_length}')
        slot = bisect.bisect_left(room_left, (length, -1))
        if slot < len(room_left):
            room, target = room_left.pop(slot)
        else:
            room, target = max_length, len(bins)
            bins.append([])
        bins[target].append(index)
        if room > length:
            bisect.insort(room_left, (room - length, target))
    return bins


def concat_rows(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One packed feature from encoded rows (their other columns are dropped)."""
    packed: Dict[str, Any] = {'input_ids': [], 'labels': [], 'position_ids': []}
    for row in rows:
        for key in packed:
            packed[key].extend(row[key])
    length = len(packed['input_ids'])
    return {**packed, 'attention_mask': [1] * length, 'length': length}


def pack_rows(rows: Sequence[Dict[str, Any]], max_length: int) -> List[Dict[str, Any]]:
    """Encoded rows -> packed rows (what a benchmark of packed vs padded batches feeds the model)."""
    return [concat_rows([rows[i] for i in group]) for group in pack_lengths([r['length'] for r in rows], max_length)]


class PackingDataset(Dataset):
    """A Dataset whose rows become packed rows after ``encode()`` and ``pack_dataset()``.

    Packing is lazy: ``pack_dataset`` only plans the bins; a packed row is built when read.
    """

    bins: Optional[List[List[int]]] = None

    def pack_dataset(self, max_length: Optional[int] = None) -> None:
        """Plan bins of at most ``max_length`` tokens (default: the template's ``max_length``)."""
        if 'length' not in (self.dataset.column_names or []):
            raise ValueError('call encode() before pack_dataset()')
        max_length = max_length or (self.template.max_length if self.template else None)
        if max_length is None:
            raise ValueError('pass max_length, or set a template with max_length')
        self.bins = pack_lengths(self.dataset['length'], max_length)

    def __len__(self) -> int:
        return super().__len__() if self.bins is None else len(self.bins)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if self.bins is None:
            return super().__getitem__(index)
        return concat_rows(rows_of(self.dataset[self.bins[index]]))

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def _apply(self, dataset_meta, transform) -> None:
        super()._apply(dataset_meta, transform)
        self.bins = None  # the rows changed: the plan no longer fits them


class IterablePackingDataset(Dataset):
    """Streaming packing: reads encoded rows lazily and packs each ``buffer_size`` of them.

    A bigger buffer packs tighter and holds more rows in memory; the last partial buffer is
    packed too, so every sample appears exactly once.
    """

    def __init__(self, dataset_meta):
        super().__init__(dataset_meta, streaming=True)
        self.max_length: Optional[int] = None
        self.buffer_size = 1000

    def pack_dataset(self, max_length: Optional[int] = None, buffer_size: int = 1000) -> None:
        max_length = max_length or (self.template.max_length if self.template else None)
        if max_length is None:
            raise ValueError('pass max_length, or set a template with max_length')
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f'buffer_size must be a positive int, got {buffer_size!r}')
        self.max_length, self.buffer_size = max_length, buffer_size

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if self.max_length is None:
            yield from super().__iter__()
            return
        buffer: List[Dict[str, Any]] = []
        for row in super().__iter__():
            buffer.append(row)
            if len(buffer) == self.buffer_size:
                yield from pack_rows(buffer, self.max_length)
                buffer = []
        if buffer:
            yield from pack_rows(buffer, self.max_length)
