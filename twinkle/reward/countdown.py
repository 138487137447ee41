"""Countdown: the equation in <answer></answer> uses each given number once and equals the target.

Parsed with ``ast`` and evaluated over + - * / and parentheses only: never ``eval`` of model output.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Any, Dict, List, Optional

from .base import Reward, required_fact

_ANSWER = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)
_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}


class CountdownReward(Reward):
    """1.0 for a correct equation (each of ``nums`` used exactly once, value == ``target`` to 1e-6),
    else 0.0 (no answer, other numbers, a syntax error, division by zero)."""

    def score(self, completion: str, facts: Dict[str, Any]) -> float:
        target = required_fact(facts, 'target', type(self).__name__)
        nums = required_fact(facts, 'nums', type(self).__name__)
        answers = _ANSWER.findall(completion)
        if not answers:
            return 0.0
        used: List[int] = []
        value = _evaluate(answers[-1].strip(), used)
        if value is None or Counter(used) != Counter(int(n) for n in nums):
            return 0.0
        return float(abs(value - float(target)) <= 1e-6)


def _evaluate(expression: str, used: List[int]) -> Optional[float]:
    try:
        tree = ast.parse(expression, mode='eval')
        return _value(tree.body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def _value(node: ast.AST, used: List[int]) -> float:
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left, used), _value(node.right, used))
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return float(node.value)
    raise ValueError(f'not allowed in an equation: {type(node).__name__}')
