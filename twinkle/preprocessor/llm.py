"""Preprocessors for common text datasets: self-cognition, Alpaca, GSM8K, Countdown."""
from __future__ import annotations

from typing import Any, Dict

from twinkle.template import Trajectory

from .base import Preprocessor


class SelfCognitionProcessor(Preprocessor):
    """``query`` / ``response`` rows about the assistant itself, with its name and author filled in.

    Placeholders are ``{name}`` / ``{author}`` (the shipped asset) and ``{{NAME}}`` / ``{{AUTHOR}}``
    (the ``swift/self-cognition`` hub dataset), so either source trains the same identity. As
    upstream, each trajectory starts with the default system message.
    """

    required_fields = text_fields = ('query', 'response')
    system = 'You are a helpful assistant.'

    def __init__(self, model_name: str, model_author: str):
        self.replacements = {'{{NAME}}': model_name, '{{AUTHOR}}': model_author,
                             '{name}': model_name, '{author}': model_author}

    def fill(self, text: str) -> str:
        for placeholder, value in self.replacements.items():
            text = text.replace(placeholder, value)
        return text

    def preprocess(self, row: Dict[str, Any]) -> Trajectory:
        return Trajectory(messages=[{'role': 'system', 'content': self.system},
                                    {'role': 'user', 'content': self.fill(row['query'])},
                                    {'role': 'assistant', 'content': self.fill(row['response'])}])


class AlpacaProcessor(Preprocessor):
    """``instruction`` (+ optional ``input``) -> ``output``."""

    required_fields = ('instruction', 'output')
    text_fields = ('instruction', 'input', 'output')

    def preprocess(self, row: Dict[str, Any]) -> Trajectory:
        prompt = row['instruction'] + (f'\n\n{row["input"]}' if row.get('input') else '')
        return Trajectory(messages=[{'role': 'user', 'content': prompt},
                                    {'role': 'assistant', 'content': row['output']}])


class GSM8KProcessor(Preprocessor):
    """Grade-school math: ``question`` -> worked ``answer`` ending in ``#### <number>``.

    ``user_data[0]['ground_truth']`` holds that final number for accuracy rewards.
    """

    required_fields = text_fields = ('question', 'answer')
    system = 'Solve the problem step by step, then give the final number after "####".'

    def preprocess(self, row: Dict[str, Any]) -> Trajectory:
        final = row['answer'].rsplit('####', 1)[-1].strip().replace(',', '')
        return Trajectory(messages=[{'role': 'system', 'content': self.system},
                                    {'role': 'user', 'content': row['question']},
                                    {'role': 'assistant', 'content': row['answer']}],
                          user_data=[{'ground_truth': final}])


class CountdownProcessor(Preprocessor):
    """Countdown: reach ``target`` from ``nums`` with + - * /, each number once (an RL prompt).

    ``user_data[0]`` keeps ``target`` and ``nums`` for the reward that checks the equation.
    """

    required_fields = ('target', 'nums')
    system = 'Think through the problem inside <think></think>, then answer inside <answer></answer>.'

    def preprocess(self, row: Dict[str, Any]) -> Trajectory:
        nums = [int(n) for n in row['nums']]
        target = int(row['target'])
        prompt = (f'Use the numbers {nums} exactly once each, with + - * / and parentheses, to write an '
                  f'equation equal to {target}. Put only the equation in <answer></answer>, '
                  f'e.g. <answer>(1 + 2) * 3</answer>.')
        return Trajectory(messages=[{'role': 'system', 'content': self.system},
                                    {'role': 'user', 'content': prompt}],
                          user_data=[{'target': target, 'nums': nums}])
