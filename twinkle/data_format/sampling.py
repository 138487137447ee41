"""Sampling requests and results, shaped as vLLM's so either sampler returns the same thing."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

STOP_REASONS = ('stop', 'length')


@dataclass
class SamplingParams:
    """``max_tokens`` new tokens at most; ``temperature`` 0 = greedy; ``top_p`` in (0, 1];
    ``top_k`` None / -1 = off; ``num_samples`` completions per prompt; ``logprobs``: None = the
    chosen token's log-prob only, k = also the k most likely alternatives; ``stop``: strings that
    end a completion (kept out of it); ``seed``: the same seed gives the same completions."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    num_samples: int = 1
    logprobs: Optional[int] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    seed: Optional[int] = None

    def __post_init__(self):
        _check_int('max_tokens', self.max_tokens, low=1)
        _check_int('num_samples', self.num_samples, low=1)
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f'SamplingParams.temperature must be a finite number >= 0, got {self.temperature!r}')
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f'SamplingParams.top_p must be in (0, 1], got {self.top_p!r}')
        if self.top_k == -1:
            self.top_k = None
        if self.top_k is not None:
            _check_int('top_k', self.top_k, low=1)
        if self.logprobs is not None:
            _check_int('logprobs', self.logprobs, low=0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(text, str) and text for text in self.stop):
            raise ValueError(f'SamplingParams.stop must be non-empty strings, got {self.stop!r}')
        if self.seed is not None:
            _check_int('seed', self.seed, low=0)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SampledSequence:
    """One completion. ``logprobs[t]`` is a list of ``(token_id, logprob)``: the chosen token first,
    then the top alternatives when asked (so ``logprobs[t][0][1]`` is the chosen token's, as the
    seeds read it). ``new_input_feature``: prompt + completion encoded for training (labels on the
    completion only) with the chat (completion appended) and ``user_data`` for rewards."""

    tokens: List[int]
    logprobs: List[List[Tuple[int, float]]]
    stop_reason: str
    text: str = ''
    new_input_feature: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f'stop_reason must be one of {STOP_REASONS}, got {self.stop_reason!r}')
        if len(self.logprobs) != len(self.tokens):
            raise ValueError(f'logprobs has {len(self.logprobs)} entries for {len(self.tokens)} tokens')

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in {f.name for f in fields(self)} else default


@dataclass
class SampleResponse:
    """The completions of one prompt."""

    sequences: List[SampledSequence]

    def __getitem__(self, key: str) -> Any:
        if key != 'sequences':
            raise KeyError(key)
        return self.sequences

    def get(self, key: str, default: Any = None) -> Any:
        return self.sequences if key == 'sequences' else default


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f'SamplingParams.{name} must be an int >= {low}, got {value!r}')
