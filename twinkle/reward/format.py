"""A tag format such as ``<think>...</think><answer>...</answer>``: the toy reward a tiny model learns."""
from __future__ import annotations

import re
from typing import Any, Dict, Sequence

from .base import Reward


class FormatReward(Reward):
    """1.0 when the completion is exactly the ``tags`` in order, each non-empty, with only whitespace
    between and around them; 0.0 otherwise."""

    def __init__(self, tags: Sequence[str] = ('think', 'answer')):
        if isinstance(tags, str) or not tags or not all(isinstance(t, str) and re.fullmatch(r'\w+', t) for t in tags):
            raise ValueError(f'tags must be a non-empty list of tag names (letters, digits, _), got {tags!r}')
        self.tags = tuple(tags)
        self._pattern = re.compile(r'\s*' + r'\s*'.join(rf'<{t}>(?=\s*\S)(.+?)</{t}>' for t in self.tags) + r'\s*',
                                   re.DOTALL)

    def score(self, completion: str, facts: Dict[str, Any]) -> float:
        return float(self._pattern.fullmatch(completion) is not None)
