"""Offline assets: tiny Qwen3 / Qwen3-MoE model directories and a self-cognition dataset.

Nothing large is committed. A model directory (config, seeded random weights, Qwen's tokenizer
with a ChatML template) is materialised on first use under ``$TWINKLE_CACHE`` (default
``~/.cache/twinkle``) and loads with ``AutoConfig`` / ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained(path)`` with no network. The cache key hashes everything
that shapes the files, so editing a config below rebuilds instead of reusing stale files.

    from twinkle import assets
    path = assets.tiny_model_path('qwen3')        # or 'qwen3_moe'
    rows = assets.self_cognition_path()           # jsonl: query / response / lang
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

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
    spec = TINY_MODELS[name]
    return str(_materialise(f'{name}-{_fingerprint(spec, SEED)}', lambda d: _save_model(d, spec)))


def self_cognition_path() -> str:
    """The shipped self-cognition jsonl ({name}/{author} placeholders, English and Chinese)."""
    return str(Path(__file__).with_name('data') / 'self_cognition.jsonl')


def cache_dir() -> Path:
    return Path(os.environ.get('TWINKLE_CACHE', Path.home() / '.cache' / 'twinkle')) / 'assets'


def _tokenizer_dir() -> Path:
    return _materialise(f'qwen-tokenizer-{_fingerprint({}, None)}',
                        lambda d: save_qwen_tokenizer(str(d), MAX_POSITIONS))


def _save_model(directory: Path, spec: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config_kwargs = dict(spec)
    config = AutoConfig.for_model(config_kwargs.pop('model_type'), **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer = _tokenizer_dir()
    for file in _TOKENIZER_FILES:
        shutil.copy(tokenizer / file, directory / file)


def _materialise(key: str, build) -> Path:
    """Build into a temporary sibling and rename: concurrent first uses never see half a directory."""
    target = cache_dir() / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info('building offline asset %s (first use)', target)
    staging = Path(tempfile.mkdtemp(prefix=f'.{key}-', dir=target.parent))
    try:
        build(staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # a concurrent builder winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _fingerprint(spec: dict, seed) -> str:
    import transformers
    recipe = json.dumps([spec, seed, CHAT_TEMPLATE.read_text(encoding='utf-8'), QWEN_ADDED_TOKENS,
                         transformers.__version__.split('.')[0]], sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]
