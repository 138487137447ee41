"""Offline assets: tiny Qwen3 / Qwen3-MoE model directories and a self-cognition dataset.

Nothing large is committed. A model directory (config, seeded random weights, Qwen's tokenizer
with a ChatML template) is materialised on first use under ``$TWINKLE_CACHE/assets`` (default
``~/.cache/twinkle/assets``) and loads with ``AutoConfig`` / ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained(path)`` with no network. The cache key hashes everything
that shapes the files, so editing a config below rebuilds instead of reusing stale files.

Building never depends on torch.distributed: the files are written by the calling process itself
(not ``save_pretrained``, which since transformers 5.24 writes weights on rank 0 only), one builder at
a time, and a directory missing any file of its manifest is rebuilt (``twinkle.utils.cache``).

    from twinkle import assets
    path = assets.tiny_model_path('qwen3')        # or 'qwen3_moe'
    rows = assets.self_cognition_path()           # jsonl: query / response / lang
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from twinkle.utils import cache
from twinkle.utils.logger import get_logger

from .tokenizer import CHAT_TEMPLATE, QWEN_ADDED_TOKENS, qwen_token_id, save_qwen_tokenizer

logger = get_logger(__name__)

SEED = 0
MAX_POSITIONS = 4096
QWEN_VOCAB = 151936  # Qwen3's embedding rows: 151,669 tokens padded up
_SHARED = dict(vocab_size=QWEN_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
               tie_word_embeddings=True, rope_theta=1_000_000.0,
               bos_token_id=qwen_token_id('<|endoftext|>'), eos_token_id=qwen_token_id('<|im_end|>'),
               pad_token_id=qwen_token_id('<|endoftext|>'))
TINY_MODELS = {
    'qwen3': dict(_SHARED, model_type='qwen3', intermediate_size=128),
    'qwen3_moe': dict(_SHARED, model_type='qwen3_moe', intermediate_size=128, moe_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True),
}
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja')


def tiny_model_path(name: str = 'qwen3') -> str:
    """A local directory holding the tiny ``name`` model, built on first use (seeded, deterministic)."""
    if name not in TINY_MODELS:
        raise ValueError(f'name must be one of {", ".join(TINY_MODELS)}, got {name!r}')
    directory = model_directory(name)
    return str(cache.materialise(directory, lambda d: _save_model(d, TINY_MODELS[name]), f'offline asset {name}'))


def model_directory(name: str) -> Path:
    """Where ``tiny_model_path(name)`` keeps its files (nothing is built)."""
    return cache_dir() / f'{name}-{_fingerprint(TINY_MODELS[name], SEED)}'


def self_cognition_path() -> str:
    """The shipped self-cognition jsonl ({name}/{author} placeholders, English and Chinese)."""
    return str(Path(__file__).with_name('data') / 'self_cognition.jsonl')


def gsm8k_path() -> str:
    """The shipped GSM8K-style jsonl (24 handwritten grade-school problems, ``question`` / ``answer``
    ending in ``#### <number>``), the RL example's prompts."""
    return str(Path(__file__).with_name('data') / 'gsm8k_tiny.jsonl')


def cache_dir() -> Path:
    return cache.entry('assets')


def _tokenizer_dir() -> Path:
    return cache.materialise(cache_dir() / f'qwen-tokenizer-{_fingerprint({}, None)}',
                             lambda d: save_qwen_tokenizer(str(d), MAX_POSITIONS), 'the offline Qwen tokenizer')


def _save_model(directory: Path, spec: dict) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    config_kwargs = dict(spec)
    config = AutoConfig.for_model(config_kwargs.pop('model_type'), **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_file(_untied_state_dict(model), directory / 'model.safetensors', metadata={'format': 'pt'})
    tokenizer = _tokenizer_dir()
    for file in _TOKENIZER_FILES:
        shutil.copy(tokenizer / file, directory / file)


def _untied_state_dict(model) -> dict:
    """One entry per storage (a tied lm_head is the embedding: kept under the embedding's name, first)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    return state


def _fingerprint(spec: dict, seed) -> str:
    import transformers
    recipe = json.dumps([spec, seed, CHAT_TEMPLATE.read_text(encoding='utf-8'), QWEN_ADDED_TOKENS,
                         transformers.__version__.split('.')[0]], sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]
