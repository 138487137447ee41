"""Which tokens of a batch each sequence-parallel rank holds: zigzag shards over ulysses x cp.

Context parallelism splits every row's sequence dimension over the ``cp x ulysses`` ranks (they
read the same data slice). Causal attention makes a plain split uneven (the last rank's queries
see every key, the first rank's almost none), so each sequence is padded to a multiple of
``2 x cp`` and cut into ``2 x cp`` chunks; cp rank r holds chunks r and 2cp-1-r (zigzag, or
head-tail): one early and one late, the same work on every rank. Ulysses then splits each cp
rank's tokens into ``ulysses`` contiguous pieces (its all-to-all gathers them back before
attention). Sequences are zigzagged one by one, so packed rows (several samples per row) and
padded rows (one sample, pads at the end) are the same case; a row's tail padding becomes a
sequence of its own, never attended by real tokens.

``shard_sequences`` computes all of it once per batch on the host, where the batch is built:
each rank's token indices and position ids, and the boundaries its attention needs
(``cu_seq_lens`` of the cp rank's tokens, and the indices of every sequence's early and late
chunk, which ring attention uses to mask whole key blocks instead of single tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass(frozen=True)
class SequenceShards:
    """The shard layout of one batch of ``rows`` rows of ``length`` tokens over ``cp x ulysses``
    ranks (rank ``cp_index * ulysses + ulysses_index``, the mesh's order). Every tensor is on the
    CPU until ``to(device)``; the layout is the same on every rank except ``source``/``position_ids``."""

    cp: int
    ulysses: int
    rows: int
    length: int
    padded_length: int          # per row: a multiple of 2 x cp x ulysses
    source: torch.Tensor        # (ranks, rows, local_length) long: the row token each slot holds, -1 a pad
    position_ids: torch.Tensor  # (ranks, rows, local_length) long: position within its sequence
    cu_seq_lens: torch.Tensor   # int32 (sequences + 1,): the cp rank's tokens (rows x cp_length, flattened)
    cu_half: torch.Tensor       # int32 (sequences + 1,): the same sequences' chunks (half the lengths)
    first: torch.Tensor         # long: the cp-rank tokens in every sequence's early chunk
    second: torch.Tensor        # long: ... and in its late chunk
    max_length: int             # the longest sequence in cu_seq_lens

    @property
    def ranks(self) -> int:
        return self.cp * self.ulysses

    @property
    def local_length(self) -> int:
        """Tokens per row on each rank."""
        return self.padded_length // self.ranks

    @property
    def cp_length(self) -> int:
        """Tokens per row of a cp rank (its ulysses pieces together): what its attention sees."""
        return self.padded_length // self.cp

    def to(self, device) -> 'SequenceShards':
        moved = {name: getattr(self, name).to(device) for name in
                 ('source', 'position_ids', 'cu_seq_lens', 'cu_half', 'first', 'second')}
        return SequenceShards(self.cp, self.ulysses, self.rows, self.length, self.padded_length,
                              max_length=self.max_length, **moved)

    def shard(self, tensor: torch.Tensor, rank: int, fill=0) -> torch.Tensor:
        """Rank ``rank``'s slots ``(rows, local_length, ...)`` of ``tensor`` ``(rows, length, ...)``,
        ``fill`` in the pads (e.g. -100 for labels)."""
        if tensor.dim() < 2 or tuple(tensor.shape[:2]) != (self.rows, self.length):
            raise ValueError(f'tensor must start with the batch shape {(self.rows, self.length)}, '
                             f'got {tuple(tensor.shape)}')
        _check_rank(rank, self.ranks)
        source = self.source[rank].to(tensor.device)
        taken = tensor.gather(1, source.clamp(min=0).reshape(*source.shape, *[1] * (tensor.dim() - 2))
                              .expand(*source.shape, *tensor.shape[2:]))
        pads = (source < 0).reshape(*source.shape, *[1] * (tensor.dim() - 2))
        return taken.masked_fill(pads, fill)

    def unshard(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The batch ``(rows, length, ...)`` from every rank's part (pads dropped): ``shard``'s inverse."""
        if len(parts) != self.ranks:
            raise ValueError(f'parts must hold one tensor per rank ({self.ranks}), got {len(parts)}')
        first = parts[0]
        full = first.new_zeros((self.rows, self.length, *first.shape[2:]))
        for rank, part in enumerate(parts):
            source = self.source[rank].to(part.device)
            real = source >= 0
            rows = torch.arange(self.rows, device=part.device)[:, None].expand_as(source)
            full[rows[real], source[real]] = part[real]
        return full


def shard_sequences(lengths: Sequence[Sequence[int]], length: int, cp: int = 1, ulysses: int = 1) -> SequenceShards:
    """The zigzag layout of a batch whose row r holds sequences of ``lengths[r]`` tokens from its
    start (their sum at most ``length``; the rest of the row is padding)."""
    for name, size in (('cp', cp), ('ulysses', ulysses), ('length', length)):
        if not isinstance(size, int) or isinstance(size, bool) or size < (0 if name == 'length' else 1):
            raise ValueError(f'{name} must be a {"non-negative" if name == "length" else "positive"} int, got {size!r}')
    rows = [list(row) for row in lengths]
    if not rows:
        raise ValueError('lengths must describe at least one row')
    for index, row in enumerate(rows):
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in row) or sum(row) > length:
            raise ValueError(f'lengths[{index}] must be non-negative ints summing to at most the row length '
                             f'{length}, got {row}')
    chunks, ranks = 2 * cp, cp * ulysses
    padded = [[(n, -(-n // chunks) * chunks) for n in row if n] for row in rows]  # (real, padded) per sequence
    multiple = chunks * ulysses
    padded_length = max(max(-(-sum(p for _, p in row) // multiple) * multiple for row in padded), multiple)
    piece = padded_length // ranks
    sources: List[List[torch.Tensor]] = [[] for _ in range(ranks)]
    positions: List[List[torch.Tensor]] = [[] for _ in range(ranks)]
    halves: List[int] = []  # every sequence's chunk length, row by row: the same on every cp rank
    for sequences in padded:
        tail = padded_length - sum(p for _, p in sequences)
        sequences = sequences + ([(0, tail)] if tail else [])  # the row's padding: a sequence of pads
        row_source, row_position, start = [], [], 0
        for n, p in sequences:  # the padded row: each sequence's tokens, then its pads
            slots = torch.arange(p)
            row_source.append(torch.where(slots < n, start + slots, -1))
            row_position.append(slots)
            start += n
            halves.append(p // chunks)
        row_source, row_position = torch.cat(row_source), torch.cat(row_position)
        offsets = [0]
        for _, p in sequences:
            offsets.append(offsets[-1] + p)
        for cp_rank in range(cp):
            picked = torch.cat([offset + c * (p // chunks) + torch.arange(p // chunks)
                                for offset, (_, p) in zip(offsets, sequences) for c in (cp_rank, chunks - 1 - cp_rank)])
            for u in range(ulysses):
                mine = picked[u * piece:(u + 1) * piece]
                sources[cp_rank * ulysses + u].append(row_source[mine])
                positions[cp_rank * ulysses + u].append(row_position[mine])
    half = torch.tensor(halves, dtype=torch.long)
    cu_half = torch.cat([torch.zeros(1, dtype=torch.long), half.cumsum(0)])
    first = torch.cat([2 * start + torch.arange(h) for start, h in zip(cu_half[:-1].tolist(), halves)])
    return SequenceShards(cp, ulysses, len(rows), length, padded_length,
                          source=torch.stack([torch.stack(r) for r in sources]),
                          position_ids=torch.stack([torch.stack(r) for r in positions]),
                          cu_seq_lens=(2 * cu_half).to(torch.int32), cu_half=cu_half.to(torch.int32),
                          first=first, second=first + half.repeat_interleave(half), max_length=2 * max(halves))


def sequence_lengths(rows: int, length: int, attention_mask: Optional[torch.Tensor] = None,
                     position_ids: Optional[torch.Tensor] = None) -> List[List[int]]:
    """Per row, the lengths of its sequences: its real tokens (``attention_mask``, which must pad
    on the right: a pad before a real token would be attended by it) cut wherever ``position_ids``
    restart at 0 (packed rows). Reads both tensors on the host: once per batch."""
    real = [length] * rows
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (rows, length):
            raise ValueError(f'attention_mask must have shape {(rows, length)}, got {tuple(attention_mask.shape)}')
        mask = attention_mask.bool().cpu()
        real = mask.sum(1).tolist()
        for row, n in enumerate(real):
            if not bool(mask[row, :n].all()):
                raise ValueError(f'attention_mask row {row} is not padded on the right: context parallelism '
                                 f'cuts sequences from the row start (left-padded batches are not supported)')
    if position_ids is None:
        return [[n] for n in real]
    if tuple(position_ids.shape[-2:]) != (rows, length) and tuple(position_ids.shape) != (1, length):
        raise ValueError(f'position_ids must have shape {(rows, length)}, got {tuple(position_ids.shape)}')
    position_ids = position_ids.reshape(-1, length).expand(rows, length).cpu()
    lengths = []
    for row, n in enumerate(real):
        starts = [0] + [t for t in (position_ids[row, 1:n] == 0).nonzero().flatten().add(1).tolist()]
        lengths.append([end - start for start, end in zip(starts, starts[1:] + [n]) if end > start] if n else [])
    return lengths


def _check_rank(rank: int, ranks: int) -> None:
    if not isinstance(rank, int) or not 0 <= rank < ranks:
        raise ValueError(f'rank must be an int in [0, {ranks}), got {rank!r}')


__all__ = ['SequenceShards', 'sequence_lengths', 'shard_sequences']
