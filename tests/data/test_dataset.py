"""Dataset: loading every supported source, slicing, preprocessing, encoding, mixing; packing."""
import json
import random

import pytest

from twinkle import assets
from twinkle.dataset import (Dataset, DatasetMeta, IterablePackingDataset, PackingDataset, pack_lengths,
                             pack_rows)
from twinkle.preprocessor import SelfCognitionProcessor
from twinkle.template import Template, load_tokenizer

ROWS = [{'query': f'Question {i}?', 'response': f'Answer {i} ' + 'and more ' * (i % 7)} for i in range(23)]


@pytest.fixture(scope='module')
def tokenizer():
    return load_tokenizer(assets.tiny_model_path('qwen3'))


@pytest.fixture
def files(tmp_path):
    """The same rows as jsonl, json, csv, parquet, and a directory of jsonl."""
    import datasets
    table = datasets.Dataset.from_list(ROWS)
    (tmp_path / 'rows.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
    (tmp_path / 'rows.json').write_text(json.dumps(ROWS))
    table.to_csv(str(tmp_path / 'rows.csv'), index=False)
    table.to_parquet(str(tmp_path / 'rows.parquet'))
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'folder' / 'part.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
    return tmp_path


@pytest.mark.parametrize('name', ['rows.jsonl', 'rows.json', 'rows.csv', 'rows.parquet', 'folder'])
def test_local_sources(files, name):
    dataset = Dataset(DatasetMeta(str(files / name)))
    assert len(dataset) == len(ROWS) and [dict(row) for row in dataset] == ROWS


def test_in_memory_rows_and_string_ids(files):
    assert list(Dataset(rows=ROWS)) == ROWS
    assert len(Dataset(str(files / 'rows.jsonl'))) == len(ROWS)


def test_data_slice_wraps_around():
    dataset = Dataset(DatasetMeta(assets.self_cognition_path(), data_slice=range(1000)))
    assert len(dataset) == 1000 and dataset[0] == dataset[318] == dataset[636]


@pytest.mark.parametrize('meta, message', [
    (lambda f: DatasetMeta(str(f / 'rows.txt.gz')), "unsupported file type '.gz'"),
    (lambda f: DatasetMeta(''), 'dataset_id must be a non-empty string'),
    (lambda f: DatasetMeta(str(f / 'rows.csv'), data_slice='abc'), 'data_slice must be an iterable of row indices'),
    (lambda f: DatasetMeta(str(f / 'rows.csv'), data_slice=[1, -2]), 'non-negative ints'),
])
def test_bad_sources(files, meta, message):
    (files / 'rows.txt.gz').write_bytes(b'')
    with pytest.raises(ValueError, match=message):
        Dataset(meta(files))


def test_map_set_template_encode(tokenizer):
    dataset = Dataset(rows=ROWS[:5])
    dataset.map('SelfCognitionProcessor', init_args={'model_name': 'T', 'model_author': 'M'})
    with pytest.raises(ValueError, match=r'call set_template\(...\) before encode'):
        dataset.encode()
    dataset.set_template('Qwen3_5Template', tokenizer=tokenizer, max_length=64)
    dataset.encode(batched=False)
    row = dataset[2]
    assert set(row) == {'messages', 'input_ids', 'labels', 'attention_mask', 'position_ids', 'length'}
    expected = Template(tokenizer=tokenizer).encode({'messages': row['messages']})
    assert {key: row[key] for key in expected} == expected


def test_encode_deletes_or_names_over_long_samples(tokenizer):
    rows = [{'query': 'q', 'response': 'short'}, {'query': 'q', 'response': 'long ' * 80},
            {'query': 'q', 'response': 'fine'}]
    dataset = Dataset(rows=rows)
    dataset.map(SelfCognitionProcessor('a', 'b'))
    dataset.set_template(Template, tokenizer=tokenizer, max_length=40, truncation_strategy='raise')
    with pytest.raises(ValueError, match='sample 1 has 10[0-9] tokens, more than max_length=40'):
        dataset.encode()
    dataset.set_template(Template(tokenizer=tokenizer, max_length=40, truncation_strategy='delete'))
    dataset.encode()
    assert [row['messages'][2]['content'] for row in dataset] == ['short', 'fine']


def test_filter_add_and_mix(files):
    dataset = Dataset(DatasetMeta(str(files / 'rows.jsonl')))
    other = DatasetMeta(str(files / 'rows.csv'), data_slice=range(3))
    dataset.add_dataset(other)
    with pytest.raises(ValueError, match='2 datasets are loaded'):
        len(dataset)
    with pytest.raises(ValueError, match='already loaded'):
        dataset.add_dataset(other)
    dataset.filter(lambda row: row['query'] != 'Question 1?', dataset_meta=other)
    dataset.mix_dataset(interleave=False)
    assert len(dataset) == len(ROWS) + 2
    assert [row['query'] for row in dataset][-2:] == ['Question 0?', 'Question 2?']


def test_interleave():
    dataset = Dataset(rows=[{'x': i} for i in range(3)])
    dataset.datasets['more'] = Dataset(rows=[{'x': 10 + i} for i in range(3)]).dataset
    dataset.mix_dataset()
    assert [row['x'] for row in dataset] == [0, 10, 1, 11, 2, 12]


def test_streaming(files):
    dataset = Dataset(DatasetMeta(str(files / 'rows.jsonl')), streaming=True)
    dataset.map(SelfCognitionProcessor('a', 'b'))
    with pytest.raises(TypeError, match='no length'):
        len(dataset)
    assert [row['messages'][1]['content'] for row in dataset] == [r['query'] for r in ROWS]


# -- packing -------------------------------------------------------------------------------------

@pytest.mark.parametrize('seed', range(4))
def test_pack_lengths_fills_bins_without_overflow(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(200, 512)]) for _ in range(rng.randint(1, 300))]
    bins = pack_lengths(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each sample exactly once
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # No packing beats both bounds below; best-fit decreasing stays within 11/9 of the optimum + 1.
    lower_bound = max(-(-sum(lengths) // 512), sum(length > 256 for length in lengths))
    assert len(bins) <= lower_bound * 11 / 9 + 1


def test_pack_lengths_edge_cases():
    assert pack_lengths([], 8) == []
    assert pack_lengths([8, 8], 8) == [[0], [1]]
    assert pack_lengths([5, 3, 4, 4], 8) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match='sample 1 has 9 tokens, more than max_length=8'):
        pack_lengths([2, 9], 8)
    with pytest.raises(ValueError, match='max_length must be a positive int'):
        pack_lengths([2], 0)


def samples_of(packed_rows):
    """Split packed rows back into samples at position 0, as (input_ids, labels) tuples."""
    samples = []
    for row in packed_rows:
        assert row['length'] == len(row['input_ids']) == len(row['labels']) == len(row['attention_mask'])
        for token, label, position in zip(row['input_ids'], row['labels'], row['position_ids']):
            if position == 0:
                samples.append(([], []))
            samples[-1][0].append(token)
            samples[-1][1].append(label)
    return sorted((tuple(ids), tuple(labels)) for ids, labels in samples)


def test_packing_dataset_keeps_every_sample_once(tokenizer):
    dataset = PackingDataset(DatasetMeta(assets.self_cognition_path(), data_slice=range(60)))
    dataset.map(SelfCognitionProcessor('Twinkle', 'ModelScope'))
    dataset.set_template('Template', tokenizer=tokenizer, max_length=256)
    dataset.encode()
    originals = samples_of(list(dataset))
    with pytest.raises(ValueError, match='call encode'):
        PackingDataset(rows=[{'x': 1}]).pack_dataset(10)
    dataset.pack_dataset()
    packed = [dataset[i] for i in range(len(dataset))]
    assert len(packed) < 60 and max(row['length'] for row in packed) <= 256
    assert samples_of(packed) == originals
    assert list(dataset) == packed


def test_pack_rows_and_iterable_packing(files, tokenizer):
    plain = Dataset(DatasetMeta(str(files / 'rows.jsonl')))
    streamed = IterablePackingDataset(DatasetMeta(str(files / 'rows.jsonl')))
    for dataset in (plain, streamed):
        dataset.map(SelfCognitionProcessor('a', 'b'))
        dataset.set_template('Template', tokenizer=tokenizer, max_length=100)
        dataset.encode()
    streamed.pack_dataset(buffer_size=7)
    packed = list(streamed)
    assert max(row['length'] for row in packed) <= 100 and len(packed) < len(ROWS)
    assert samples_of(packed) == samples_of(list(plain)) == samples_of(pack_rows(list(plain), 100))


def test_encode_counts_dropped_samples_and_refuses_an_empty_result(tokenizer, twinkle_logs):
    rows = [{'query': 'q ' * 30, 'response': 'short'}, {'query': 'q', 'response': 'fine'}]
    dataset = Dataset(rows=rows)
    dataset.map(SelfCognitionProcessor('a', 'b'))
    dataset.set_template(Template(tokenizer=tokenizer, max_length=30, truncation_strategy='right'))
    dataset.encode()  # right-truncating sample 0 cuts away its whole answer: it would train on nothing
    assert len(dataset) == 1
    assert 'dropped 1 of 2 samples' in twinkle_logs.text and 'no labelled token left' in twinkle_logs.text
    dataset = Dataset(rows=rows[:1])
    dataset.map(SelfCognitionProcessor('a', 'b'))
    dataset.set_template(Template(tokenizer=tokenizer, max_length=10, truncation_strategy='delete'))
    with pytest.raises(ValueError, match='dropped all 1 samples'):
        dataset.encode()
