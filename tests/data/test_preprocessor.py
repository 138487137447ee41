"""Preprocessors: each builds the expected trajectory; a row missing a field names row and field."""
import pytest

from twinkle.dataset import Dataset
from twinkle.preprocessor import (PREPROCESSORS, AlpacaProcessor, CountdownProcessor, Filter, GSM8KProcessor,
                                  Preprocessor, SelfCognitionProcessor)


def run(preprocessor, rows):
    """The trajectories of ``rows``, through the batched call datasets makes."""
    batch = {key: [row.get(key) for row in rows] for key in rows[0]}
    out = preprocessor(batch, list(range(len(rows))))
    return [{key: out[key][i] for key in out} for i in range(len(rows))]


def test_self_cognition_fills_both_placeholder_spellings():
    (trajectory,) = run(SelfCognitionProcessor('Twinkle', 'ModelScope'),
                        [{'query': 'Is {name} yours, {{AUTHOR}}?', 'response': 'I am {{NAME}} by {author}.'}])
    assert trajectory['messages'] == [{'role': 'system', 'content': 'You are a helpful assistant.'},
                                      {'role': 'user', 'content': 'Is Twinkle yours, ModelScope?'},
                                      {'role': 'assistant', 'content': 'I am Twinkle by ModelScope.'}]


def test_alpaca_with_and_without_input():
    with_input, without = run(AlpacaProcessor(), [
        {'instruction': 'Translate.', 'input': 'bonjour', 'output': 'hello'},
        {'instruction': 'Say hi.', 'input': '', 'output': 'hi'}])
    assert with_input['messages'][0]['content'] == 'Translate.\n\nbonjour'
    assert without['messages'] == [{'role': 'user', 'content': 'Say hi.'}, {'role': 'assistant', 'content': 'hi'}]


def test_gsm8k_keeps_the_final_number():
    (trajectory,) = run(GSM8KProcessor(), [{'question': 'How many?', 'answer': '2 * 600 = 1,200\n#### 1,200'}])
    assert [m['role'] for m in trajectory['messages']] == ['system', 'user', 'assistant']
    assert trajectory['user_data'] == [{'ground_truth': '1200'}]


def test_countdown_prompt_and_user_data():
    (trajectory,) = run(CountdownProcessor(), [{'target': 24, 'nums': [3, 8, 1, 1]}])
    assert [m['role'] for m in trajectory['messages']] == ['system', 'user']
    assert '[3, 8, 1, 1]' in trajectory['messages'][1]['content'] and '24' in trajectory['messages'][1]['content']
    assert trajectory['user_data'] == [{'target': 24, 'nums': [3, 8, 1, 1]}]


def test_missing_field_names_the_row_and_the_field():
    rows = [{'query': f'q{i}', 'response': f'r{i}'} for i in range(6)]
    rows[4]['response'] = None
    dataset = Dataset(rows=rows)
    with pytest.raises(ValueError, match="row 4: missing required field 'response'"):
        dataset.map(SelfCognitionProcessor('a', 'b'), batch_size=2)  # row 4 sits in the third batch


def test_named_and_custom_preprocessors():
    class Echo(Preprocessor):
        required_fields = ('text',)

        def preprocess(self, row):
            return {'messages': [{'role': 'user', 'content': row['text']}]}

    dataset = Dataset(rows=[{'text': 'hi'}])
    dataset.map(Echo)
    assert dataset[0] == {'messages': [{'role': 'user', 'content': 'hi'}]}
    assert set(PREPROCESSORS) == {'SelfCognitionProcessor', 'AlpacaProcessor', 'GSM8KProcessor', 'CountdownProcessor'}
    with pytest.raises(ValueError, match="unknown preprocessor 'Nope'"):
        dataset.map('Nope')


def test_filter_subclass():
    class Short(Filter):
        def __call__(self, row):
            return len(row['text']) < 3

    dataset = Dataset(rows=[{'text': 'a'}, {'text': 'long'}, {'text': 'ok'}])
    dataset.filter(Short())
    assert [row['text'] for row in dataset] == ['a', 'ok']


class UpstreamStyle(Preprocessor):
    """Written to upstream Twinkle's documented contract: columnar batch in, columnar batch out,
    rows it cannot use dropped."""

    def __call__(self, rows):
        rows = self.map_col_to_row(rows)
        kept = [{'messages': [{'role': 'user', 'content': row['q']}, {'role': 'assistant', 'content': row['a']}]}
                for row in rows if row['a']]
        return self.map_row_to_col(kept)


def test_an_upstream_style_preprocessor_is_called_on_batches_and_may_drop_rows():
    rows = [{'q': f'q{i}', 'a': '' if i % 3 == 0 else f'a{i}'} for i in range(7)]
    dataset = Dataset(rows=rows)
    dataset.map(UpstreamStyle(), batch_size=4)
    assert dataset.dataset.column_names == ['messages']
    assert [row['messages'][0]['content'] for row in dataset] == ['q1', 'q2', 'q4', 'q5']


def test_preprocess_returning_none_drops_the_row(twinkle_logs):
    class KeepEven(Preprocessor):
        def preprocess(self, row):
            return None if row['n'] % 2 else {'messages': [{'role': 'user', 'content': str(row['n'])}]}

    dataset = Dataset(rows=[{'n': n} for n in range(5)])
    dataset.map(KeepEven())
    assert [row['messages'][0]['content'] for row in dataset] == ['0', '2', '4']
    assert any('KeepEven dropped 2 of 5 rows' in r.getMessage() for r in twinkle_logs.records)


def test_a_plain_function_is_called_on_batches_and_its_columns_are_merged():
    batch_sizes = []

    def add_length(batch):
        batch_sizes.append(len(batch['text']))
        return {'length': [len(text) for text in batch['text']]}

    dataset = Dataset(rows=[{'text': 'x' * n} for n in range(1, 6)])
    dataset.map(add_length, batch_size=2)
    assert batch_sizes == [2, 2, 1]  # batched, as upstream
    assert [(row['text'], row['length']) for row in dataset] == [('x' * n, n) for n in range(1, 6)]
