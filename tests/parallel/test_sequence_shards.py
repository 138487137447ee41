"""Zigzag sequence shards (one process): every real token on exactly one rank, each rank an early
and a late chunk of every sequence, equal shard lengths, positions within sequences, the
boundaries attention uses, and sequence lengths read from masks and position ids."""
import pytest
import torch

from twinkle.parallel.sequence_shards import sequence_lengths, shard_sequences


@pytest.mark.parametrize('cp, ulysses', [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2)])
@pytest.mark.parametrize('lengths, length', [([[13], [1], [6]], 13), ([[1, 9, 3, 7]], 24), ([[5, 1, 3], [11]], 11),
                                             ([[0], [4]], 4)])
def test_every_real_token_on_one_rank(lengths, length, cp, ulysses):
    shards = shard_sequences(lengths, length, cp=cp, ulysses=ulysses)
    assert shards.padded_length % (2 * cp * ulysses) == 0
    assert shards.source.shape == (cp * ulysses, len(lengths), shards.padded_length // (cp * ulysses))
    for row, row_lengths in enumerate(lengths):
        held = shards.source[:, row].flatten()
        assert sorted(held[held >= 0].tolist()) == list(range(sum(row_lengths)))
        # positions of real tokens: their place in their own sequence
        expected = torch.cat([torch.arange(n) for n in row_lengths] + [torch.zeros(0, dtype=torch.long)])
        real = shards.source[:, row] >= 0
        assert torch.equal(shards.position_ids[:, row][real], expected[shards.source[:, row][real]])
    tokens = len(lengths) * shards.cp_length
    assert shards.cu_seq_lens[-1] == tokens and shards.cu_half[-1] * 2 == tokens
    assert sorted(torch.cat([shards.first, shards.second]).tolist()) == list(range(tokens))
    x = torch.arange(len(lengths) * length).reshape(len(lengths), length, 1).float() + 1
    parts = [shards.shard(x, rank, fill=-1) for rank in range(shards.ranks)]
    full = shards.unshard(parts)
    real = torch.tensor([[t < sum(row) for t in range(length)] for row in lengths])
    assert torch.equal(full[real], x[real]) and (torch.cat(parts) != 0).all()


def test_zigzag_gives_each_cp_rank_an_early_and_a_late_chunk():
    shards = shard_sequences([[8]], 8, cp=2)
    assert shards.source[0, 0].tolist() == [0, 1, 6, 7] and shards.source[1, 0].tolist() == [2, 3, 4, 5]
    shards = shard_sequences([[8]], 8, cp=2, ulysses=2)  # ulysses splits each cp rank's tokens
    assert shards.source[:, 0].tolist() == [[0, 1], [6, 7], [2, 3], [4, 5]]


def test_each_sequence_padded_to_the_chunks_and_the_row_tail_is_its_own_sequence():
    shards = shard_sequences([[3, 1]], 10, cp=2)
    assert shards.padded_length == 8
    assert shards.cu_seq_lens.tolist() == [0, 2, 4]  # per cp rank: 2 tokens of each padded sequence
    shards = shard_sequences([[3], [9]], 9, cp=2)  # row 0: 4 tokens + a pad sequence of 8
    assert shards.padded_length == 12 and shards.cu_seq_lens.tolist() == [0, 2, 6, 12]
    assert shards.max_length == 6


def test_sequence_lengths_from_mask_and_position_ids():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 0, 1, 0, 0], [0, 1, 2, 0, 1, 2]])
    assert sequence_lengths(2, 6, mask, positions) == [[2, 2], [3, 3]]
    assert sequence_lengths(2, 6, mask) == [[4], [6]]
    assert sequence_lengths(1, 4, position_ids=torch.tensor([[0, 0, 1, 2]])) == [[1, 3]]


@pytest.mark.parametrize('call, message', [
    (lambda: shard_sequences([[3]], 3, cp=0), 'cp must be a positive int'),
    (lambda: shard_sequences([[3]], 3, ulysses=1.5), 'ulysses must be a positive int'),
    (lambda: shard_sequences([[3, 2]], 4), r'lengths\[0\] must be non-negative ints summing to at most'),
    (lambda: shard_sequences([], 4), 'at least one row'),
    (lambda: shard_sequences([[2]], 2).shard(torch.zeros(1, 3), 0), 'batch shape'),
    (lambda: shard_sequences([[2]], 2).shard(torch.zeros(1, 2), 1), r'rank must be an int in \[0, 1\)'),
    (lambda: shard_sequences([[2]], 2, cp=2).unshard([torch.zeros(1, 1)]), 'one tensor per rank'),
    (lambda: sequence_lengths(1, 3, torch.tensor([[0, 1, 1]])), 'not padded on the right'),
    (lambda: sequence_lengths(1, 3, torch.ones(1, 4)), 'attention_mask must have shape'),
    (lambda: sequence_lengths(2, 3, position_ids=torch.zeros(2, 4)), 'position_ids must have shape'),
])
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
