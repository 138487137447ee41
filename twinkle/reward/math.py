"""GSM8K: the final number, and the "#### <number>" answer format the preprocessor asks for."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

from .base import Reward, required_fact

_NUMBER = r'-?\d[\d,]*(?:\.\d+)?'
_MARKED = re.compile(r'####\s*(' + _NUMBER + ')')
_ANY_NUMBER = re.compile(_NUMBER)


def final_number(text: str) -> Optional[float]:
    """The number after the last "####", else the last number in the text; None without one."""
    marked = _MARKED.findall(text)
    found = marked or _ANY_NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(',', ''))
    except ValueError:
        return None


class GSM8KAccuracyReward(Reward):
    """1.0 when the completion's final number equals the ground truth (to 1e-6), else 0.0."""

    def score(self, completion: str, facts: Dict[str, Any]) -> float:
        truth = final_number(str(required_fact(facts, 'ground_truth', type(self).__name__)))
        answer = final_number(completion)
        return float(truth is not None and answer is not None and abs(answer - truth) <= 1e-6)


class GSM8KFormatReward(Reward):
    """1.0 when the completion ends with "#### <number>" (what GSM8KProcessor's system prompt asks)."""

    _ENDS_MARKED = re.compile(r'####\s*' + _NUMBER + r'\s*$')

    def score(self, completion: str, facts: Dict[str, Any]) -> float:
        return float(bool(self._ENDS_MARKED.search(completion.strip())))
