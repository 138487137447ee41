"""Template: a trajectory (chat messages, optional tools) to the token ids a model trains on.

The text comes from the tokenizer's own chat template, so it is the chat format the model knows.
Which tokens are assistant output is found by rendering: the chat up to assistant turn i with
the generation prompt, and up to and including turn i; the difference is what the
assistant wrote (cut after its end-of-turn token, which it must learn to emit). Those character
spans mark the tokens through the tokenizer's offsets. This works for any chat template whose
renderings of a prefix of the chat are a prefix of the whole; a template that rewrites earlier
turns (e.g. dropping old reasoning) fails with a clear error instead of mislabelling.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .features import FEATURE_KEYS, IGNORE_INDEX, InputFeature, Trajectory, columns_of, rows_of

TRUNCATION_STRATEGIES = ('raise', 'left', 'right', 'delete')
ROLES = ('system', 'user', 'assistant', 'tool')


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_id: str):
    """The tokenizer of ``model_id`` (hub id or local path); cached, loading a big vocabulary takes seconds."""
    from transformers import AutoTokenizer

    from twinkle import hub
    return AutoTokenizer.from_pretrained(hub.model_dir(model_id))


class Template:
    """Encodes trajectories for one tokenizer.

    Args:
        model_id: hub id (``ms://``, ``hf://``) or local directory whose tokenizer to use.
        tokenizer: a loaded tokenizer instead of ``model_id``.
        max_length: longest sample in tokens (None: no limit).
        truncation_strategy: what to do with a longer sample: 'raise' (error naming it), 'left'
            (keep its end), 'right' (keep its start) or 'delete' (drop it from the dataset).
    """

    def __init__(self, model_id: Optional[str] = None, *, tokenizer=None, max_length: Optional[int] = None,
                 truncation_strategy: str = 'raise'):
        if (model_id is None) == (tokenizer is None):
            raise ValueError('pass exactly one of model_id and tokenizer')
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f'max_length must be a positive int or None, got {max_length!r}')
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f'truncation_strategy must be one of {TRUNCATION_STRATEGIES}, got {truncation_strategy!r}')
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_id)
        if not getattr(self.tokenizer, 'chat_template', None):
            raise ValueError(f'the tokenizer of {model_id or type(tokenizer).__name__} has no chat_template')
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.dropped: Counter = Counter()  # why encode() dropped samples: 'too long', 'no labels left'

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def encode(self, trajectory: Trajectory, add_generation_prompt: bool = False,
               sample: Any = None) -> Optional[InputFeature]:
        """The feature of one trajectory; None when it is too long and the strategy is 'delete'.

        With ``add_generation_prompt`` the chat is a prompt for sampling: a final assistant turn
        (the reference answer) is left out, the assistant header is appended, nothing is labelled.
        ``sample`` names the trajectory in errors (the dataset passes its row index).
        """
        sample = 'sample' if sample is None else f'sample {sample}'
        messages, tools = _checked_chat(trajectory, sample)
        if add_generation_prompt:
            if messages[-1]['role'] == 'assistant':
                messages = messages[:-1]
            text, spans = self._render(messages, tools, generation_prompt=True), []
        else:
            text, spans = self._render(messages, tools), self._assistant_spans(messages, tools, sample)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding['input_ids'])
        labels = [token if any(start < span_end and end > span_start for span_start, span_end in spans)
                  else IGNORE_INDEX for token, (start, end) in zip(input_ids, encoding['offset_mapping'])]
        kept = self._truncate(len(input_ids), sample)
        if kept is None:
            self.dropped[f'longer than max_length={self.max_length} (truncation_strategy="delete")'] += 1
            return None
        had_labels = any(label != IGNORE_INDEX for label in labels)
        input_ids, labels = input_ids[kept], labels[kept]
        if had_labels and all(label == IGNORE_INDEX for label in labels):  # it would train on nothing
            self.dropped[f'no labelled token left after truncation_strategy="{self.truncation_strategy}" '
                         f'to max_length={self.max_length}'] += 1
            return None
        length = len(input_ids)
        return InputFeature(input_ids=input_ids, labels=labels, attention_mask=[1] * length,
                            position_ids=list(range(length)), length=length)

    def batch_encode(self, batch: Dict[str, list], indices: Sequence[int],
                     add_generation_prompt: bool = False) -> Dict[str, list]:
        """``datasets.map(batched=True, with_indices=True)`` form: the rows kept, with their features added."""
        rows = []
        for index, row in zip(indices, rows_of(batch)):
            feature = self.encode(row, add_generation_prompt, sample=index)
            if feature is not None:
                rows.append({**row, **feature})
        return columns_of(rows, columns=[*batch, *FEATURE_KEYS])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    # -- internals ----------------------------------------------------------------------------
    def _render(self, messages: List[dict], tools, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _assistant_spans(self, messages: List[dict], tools, sample: str) -> List[Tuple[int, int]]:
        full = self._render(messages, tools)
        end_of_turn = self.tokenizer.eos_token or ''
        spans = []
        for i, message in enumerate(messages):
            if message['role'] != 'assistant':
                continue
            prompt = self._render(messages[:i], tools, generation_prompt=True)
            through = self._render(messages[:i + 1], tools)
            if not (through.startswith(prompt) and full.startswith(through)):
                raise ValueError(f'{sample}: the chat template re-renders earlier turns, so assistant turn {i} '
                                 f'cannot be located; use a prefix-stable template')
            written = through[len(prompt):]
            cut = written.find(end_of_turn) if end_of_turn else -1
            spans.append((len(prompt), len(prompt) + (cut + len(end_of_turn) if cut >= 0 else len(written))))
        return spans

    def _truncate(self, length: int, sample: str) -> Optional[slice]:
        limit = self.max_length
        if limit is None or length <= limit:
            return slice(None)
        if self.truncation_strategy == 'raise':
            raise ValueError(f'{sample} has {length} tokens, more than max_length={limit} '
                             f'(truncation_strategy="raise"; "left", "right" or "delete" handle it)')
        if self.truncation_strategy == 'delete':
            return None
        return slice(length - limit, None) if self.truncation_strategy == 'left' else slice(0, limit)


def _checked_chat(trajectory: Trajectory, sample: str) -> Tuple[List[dict], Optional[list]]:
    messages = trajectory.get('messages') if isinstance(trajectory, dict) else None
    if not messages:
        raise ValueError(f'{sample}: needs a non-empty "messages" list (map a Preprocessor first)')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get('role') not in ROLES:
            raise ValueError(f'{sample}: messages[{i}] needs a role in {ROLES}, got {message!r}')
        content = message.get('content')
        if not isinstance(content, str) and not message.get('tool_calls'):
            raise ValueError(f'{sample}: messages[{i}].content ({message["role"]}) must be a string, got '
                             f'{type(content).__name__} {content!r}')
    tools = trajectory.get('tools')
    if isinstance(tools, str):  # datasets columns keep tool schemas as JSON text
        tools = json.loads(tools)
    return list(messages), tools or None
