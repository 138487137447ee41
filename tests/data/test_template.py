"""Template: labels cover exactly what the assistant wrote (multi-turn, system, tools), prompts for
sampling, truncation strategies, and errors that name the sample."""
import json

import pytest

from twinkle import assets
from twinkle.template import IGNORE_INDEX, TEMPLATES, Template, load_tokenizer


@pytest.fixture(scope='module')
def tokenizer():
    return load_tokenizer(assets.tiny_model_path('qwen3'))


@pytest.fixture(scope='module')
def template(tokenizer):
    return Template(tokenizer=tokenizer)


def labelled_runs(template, feature):
    """The decoded text of each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(feature['input_ids'], feature['labels']):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [template.decode(run) for run in runs + ([current] if current else [])]


MULTI_TURN = [
    {'role': 'system', 'content': 'You are brief.'},
    {'role': 'user', 'content': 'Who are you?'},
    {'role': 'assistant', 'content': 'I am Twinkle.'},
    {'role': 'user', 'content': '你会说中文吗？'},
    {'role': 'assistant', 'content': '会的，我可以用中文回答。'},
    {'role': 'user', 'content': 'Thanks'},
    {'role': 'assistant', 'content': 'You are welcome!\nBye.'},
]


def test_multi_turn_labels_exactly_the_assistant_turns(template):
    feature = template.encode({'messages': MULTI_TURN})
    assert labelled_runs(template, feature) == [
        'I am Twinkle.<|im_end|>', '会的，我可以用中文回答。<|im_end|>', 'You are welcome!\nBye.<|im_end|>']
    text = template.decode(feature['input_ids'])
    assert text == ('<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n'
                    '<|im_start|>assistant\nI am Twinkle.<|im_end|>\n<|im_start|>user\n你会说中文吗？<|im_end|>\n'
                    '<|im_start|>assistant\n会的，我可以用中文回答。<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n'
                    '<|im_start|>assistant\nYou are welcome!\nBye.<|im_end|>\n')
    n = feature['length']
    assert n == len(feature['input_ids']) == len(feature['labels'])
    assert feature['attention_mask'] == [1] * n and feature['position_ids'] == list(range(n))


def test_tool_calls_and_responses(template):
    tools = [{'type': 'function', 'function': {'name': 'weather', 'parameters': {'type': 'object'}}}]
    call = {'name': 'weather', 'arguments': {'city': 'Paris'}}
    messages = [{'role': 'user', 'content': 'Weather in Paris?'},
                {'role': 'assistant', 'content': None, 'tool_calls': [call]},
                {'role': 'tool', 'content': 'sunny'},
                {'role': 'assistant', 'content': 'It is sunny.'}]
    as_list = template.encode({'messages': messages, 'tools': tools})
    as_json = template.encode({'messages': messages, 'tools': json.dumps(tools)})
    assert as_list == as_json
    assert labelled_runs(template, as_list) == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        'It is sunny.<|im_end|>']
    text = template.decode(as_list['input_ids'])
    assert '<tools>\n{"type": "function"' in text and '<tool_response>\nsunny\n</tool_response>' in text


def test_generation_prompt_drops_the_reference_answer(template):
    chat = {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}
    prompt = template.encode(chat, add_generation_prompt=True)
    assert template.decode(prompt['input_ids']) == '<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n'
    assert set(prompt['labels']) == {IGNORE_INDEX}


def test_truncation_strategies(tokenizer, template):
    chat = {'messages': MULTI_TURN}
    full = template.encode(chat)
    limit = full['length'] - 7
    with pytest.raises(ValueError, match=rf'sample 12 has {full["length"]} tokens, more than max_length={limit}'):
        Template(tokenizer=tokenizer, max_length=limit).encode(chat, sample=12)
    assert Template(tokenizer=tokenizer, max_length=limit, truncation_strategy='delete').encode(chat) is None
    left = Template(tokenizer=tokenizer, max_length=limit, truncation_strategy='left').encode(chat)
    right = Template(tokenizer=tokenizer, max_length=limit, truncation_strategy='right').encode(chat)
    assert left['input_ids'] == full['input_ids'][7:] and left['labels'] == full['labels'][7:]
    assert right['input_ids'] == full['input_ids'][:limit] and right['labels'] == full['labels'][:limit]
    for feature in (left, right):
        assert feature['length'] == limit and feature['position_ids'] == list(range(limit))
    exact = Template(tokenizer=tokenizer, max_length=full['length']).encode(chat)
    assert exact == full


def test_batch_encode_keeps_columns_and_drops_deleted_rows(tokenizer):
    short = [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}]
    long = [{'role': 'user', 'content': 'word ' * 50}, {'role': 'assistant', 'content': 'b'}]
    template = Template(tokenizer=tokenizer, max_length=20, truncation_strategy='delete')
    out = template.batch_encode({'messages': [short, long, short], 'tag': ['x', 'y', 'z']}, [0, 1, 2])
    assert out['tag'] == ['x', 'z'] and len(out['input_ids']) == 2 and out['messages'] == [short, short]


@pytest.mark.parametrize('trajectory, message', [
    ({}, 'sample 4: needs a non-empty "messages" list'),
    ({'messages': []}, 'needs a non-empty "messages" list'),
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, r'messages\[0\] needs a role'),
    ({'messages': [{'role': 'user', 'content': 'x'}, {'role': 'assistant'}]},
     r'messages\[1\].content \(assistant\) must be a string, got NoneType'),
    ({'messages': [{'role': 'user', 'content': 7}, {'role': 'assistant', 'content': 'x'}]},
     r'sample 4: messages\[0\].content \(user\) must be a string, got int 7'),
])
def test_bad_trajectories_name_the_sample(template, trajectory, message):
    with pytest.raises(ValueError, match=message):
        template.encode(trajectory, sample=4)


def test_template_that_rewrites_history_is_refused(tokenizer):
    class Rewriting:
        """A chat template that renders the last assistant turn differently from earlier ones."""
        eos_token = '<|im_end|>'
        chat_template = 'x'

        def apply_chat_template(self, messages, add_generation_prompt=False, **_):
            last = len(messages) - 1
            return ''.join(('[last]' if i == last else '') + m['content'] for i, m in enumerate(messages))

    with pytest.raises(ValueError, match='re-renders earlier turns'):
        Template(tokenizer=Rewriting()).encode({'messages': MULTI_TURN[1:3]})


def test_construction_errors(tokenizer):
    with pytest.raises(ValueError, match='exactly one of model_id and tokenizer'):
        Template()
    with pytest.raises(ValueError, match='max_length must be a positive int'):
        Template(tokenizer=tokenizer, max_length=0)
    with pytest.raises(ValueError, match='truncation_strategy must be one of'):
        Template(tokenizer=tokenizer, truncation_strategy='middle')


def test_seed_names_and_model_id(tokenizer):
    assert TEMPLATES['Qwen3_5Template'] is Template
    template = Template(assets.tiny_model_path('qwen3'))
    assert template.tokenizer is tokenizer  # loaded once per process
    assert template.pad_token_id == tokenizer.convert_tokens_to_ids('<|endoftext|>')
