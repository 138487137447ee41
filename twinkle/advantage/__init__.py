"""Advantages for group-sampled RL: how much better each completion did than its siblings.

Rewards come flat, prompt-major: the ``num_generations`` completions of prompt 0, then of prompt 1,
and so on (the order of ``sampler.sample(prompts * N)`` regrouped per prompt, or of
``num_samples=N``). Groups whose rewards are all equal carry no signal: their advantages are 0,
never NaN.
"""
from .group import GRPOAdvantage, RLOOAdvantage

__all__ = ['GRPOAdvantage', 'RLOOAdvantage']
