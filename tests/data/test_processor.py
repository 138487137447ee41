"""InputProcessor: padded (right/left) and padding-free layouts, packed rows, micro-batches."""
import pytest
import torch

from twinkle.processor import InputProcessor

A = {'input_ids': [11, 12, 13], 'labels': [-100, 12, 13], 'position_ids': [0, 1, 2]}
B = {'input_ids': [21, 22], 'labels': [21, 22], 'position_ids': [0, 1]}
PACKED = {'input_ids': [31, 32, 33, 34, 35], 'labels': [31, 32, 33, 34, 35], 'position_ids': [0, 1, 0, 1, 2]}


def test_right_padding():
    batch = InputProcessor(pad_token_id=7)([A, B])
    assert batch['input_ids'].tolist() == [[11, 12, 13], [21, 22, 7]]
    assert batch['labels'].tolist() == [[-100, 12, 13], [-100, 22, -100]]  # first label of each sample masked
    assert batch['attention_mask'].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch['position_ids'].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_left_padding():
    batch = InputProcessor(padding_side='left')([A, B])
    assert batch['input_ids'].tolist() == [[11, 12, 13], [0, 21, 22]]
    assert batch['labels'].tolist() == [[-100, 12, 13], [-100, -100, 22]]
    assert batch['attention_mask'].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch['position_ids'].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_padding_free():
    batch = InputProcessor(padding_free=True)([A, B, PACKED])
    assert batch['input_ids'].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34, 35]]
    assert batch['position_ids'].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2]]
    assert batch['labels'].tolist() == [[-100, 12, 13, -100, 22, -100, 32, -100, 34, 35]]
    assert batch['cu_seq_lens_q'].tolist() == [0, 3, 5, 7, 10] and batch['cu_seq_lens_q'].dtype == torch.int32
    assert batch['cu_seq_lens_k'] is batch['cu_seq_lens_q']
    assert batch['max_length_q'] == batch['max_length_k'] == 3
    assert 'attention_mask' not in batch


def test_defaults_for_missing_fields_and_inputs_untouched():
    labels = list(B['labels'])
    batch = InputProcessor(padding_free=True)([{'input_ids': [5, 6]}, B])
    assert batch['labels'].tolist() == [[-100, -100, -100, 22]] and batch['position_ids'].tolist() == [[0, 1, 0, 1]]
    assert B['labels'] == labels


def test_micro_batches():
    features = [A, B, PACKED, A, B]
    batches = InputProcessor(micro_batch_size=2).micro_batches(features)
    assert [b['input_ids'].shape[0] for b in batches] == [2, 2, 1]
    assert len(InputProcessor().micro_batches(features)) == 1


@pytest.mark.parametrize('features, message', [
    ([], 'non-empty list'),
    (A, 'non-empty list'),
    ([A, {'labels': [1]}], r'features\[1\] has no input_ids'),
    ([{'input_ids': [1, 2], 'labels': [1]}], r'features\[0\]: labels has 1 entries, input_ids has 2'),
    ([{'input_ids': [1, 2], 'position_ids': [1, 2]}], 'position_ids must start at 0'),
])
def test_bad_features(features, message):
    with pytest.raises(ValueError, match=message):
        InputProcessor()(features)


def test_bad_arguments():
    with pytest.raises(ValueError, match='padding_side must be one of'):
        InputProcessor(padding_side='middle')
    with pytest.raises(ValueError, match='micro_batch_size must be a positive int'):
        InputProcessor(micro_batch_size=0)
