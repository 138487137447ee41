"""Rewards: ``reward(trajectories, ground_truths=None) -> one float per trajectory``.

A trajectory is what the sampler hands back for training (``sequence.new_input_feature``) or any
dict with ``messages``: its last assistant message is the completion judged, its ``user_data``
(from the preprocessor: GSM8K's ``ground_truth``, Countdown's ``target`` / ``nums``) what it is
judged against, unless ``ground_truths`` is given.
"""
from .base import Reward, completion_of
from .countdown import CountdownReward
from .format import FormatReward
from .math import GSM8KAccuracyReward, GSM8KFormatReward

__all__ = ['CountdownReward', 'FormatReward', 'GSM8KAccuracyReward', 'GSM8KFormatReward', 'Reward', 'completion_of']
