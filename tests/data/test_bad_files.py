"""Bad data files fail at load with the file (and line) named; values of the wrong type fail at
preprocessing with the row and field named, never as a crash deep inside Arrow or the tokenizer."""
import json

import pytest

from twinkle.dataset import Dataset, DatasetMeta
from twinkle.preprocessor import AlpacaProcessor, SelfCognitionProcessor

GOOD = '{"query": "q", "response": "r"}\n'


@pytest.mark.parametrize('name, text, message', [
    ('rows.jsonl', GOOD + GOOD + '{"query": "q", response: r}\n',
     r'rows.jsonl: line 3 is not valid JSON \(Expecting property name.*response: r'),
    ('rows.jsonl', GOOD + '[1, 2]\n', r'rows.jsonl: line 2 is a JSON list, not an object'),
    ('rows.json', '[{"query": "q"},\n {"query": }]', r'rows.json: line 2 is not valid JSON'),
    ('rows.jsonl', '', r"is empty: .*rows.jsonl holds no rows"),
    ('rows.jsonl', '\n  \n', r"is empty: .*rows.jsonl holds no rows"),
    ('rows.csv', '', r"is empty: .*rows.csv holds no rows"),
    ('rows.csv', 'query,response\n', r"is empty: .*rows.csv holds no rows"),
])
def test_bad_files_are_named_with_their_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        Dataset(DatasetMeta(str(tmp_path / name)))


def test_an_empty_file_in_a_directory_of_good_ones_is_not_an_error(tmp_path):
    (tmp_path / 'a.jsonl').write_text(GOOD * 3)
    (tmp_path / 'b.jsonl').write_text('')
    assert len(Dataset(DatasetMeta(str(tmp_path)))) == 3


def test_a_bad_line_in_a_directory_is_named(tmp_path):
    (tmp_path / 'a.jsonl').write_text(GOOD * 3)
    (tmp_path / 'b.jsonl').write_text(GOOD + '{oops\n')
    with pytest.raises(ValueError, match=r'b.jsonl: line 2 is not valid JSON'):
        Dataset(DatasetMeta(str(tmp_path)))


@pytest.mark.parametrize('processor, rows, message', [
    (SelfCognitionProcessor('twinkle', 'ModelScope'),
     [{'query': 'q', 'response': 'r'}, {'query': 'q', 'response': 12}],
     r"row 1: field 'response' must be a string, got int 12"),
    (AlpacaProcessor(), [{'instruction': 'i', 'input': ['x'], 'output': 'o'}],
     r"row 0: field 'input' must be a string, got list \['x'\]"),
])
def test_non_string_fields_name_the_row_and_field(tmp_path, processor, rows, message):
    (tmp_path / 'rows.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    dataset = Dataset(DatasetMeta(str(tmp_path / 'rows.jsonl')))  # json keeps mixed types per row
    with pytest.raises(ValueError, match=message):
        dataset.map(processor)


def test_in_memory_rows_of_mixed_types_name_the_field_and_rows():
    with pytest.raises(ValueError, match=r"field 'response' is str in row 0 but int in row 2"):
        Dataset(rows=[{'response': 'a'}, {'response': None}, {'response': 3}])
