"""The reward interface and what every reward reads from a trajectory."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence


class Reward:
    """Subclasses implement ``score(completion, facts) -> float``; ``facts`` is the trajectory's first
    ``user_data`` entry (or the given ground truth as ``{'ground_truth': ...}``). ``ground_truths``
    None or empty (the seeds' client calls ``FormatReward()(trajectories, [])``) = read ``user_data``."""

    def __call__(self, trajectories: Sequence[Mapping[str, Any]],
                 ground_truths: Optional[Sequence[Any]] = None) -> List[float]:
        if ground_truths is not None and len(ground_truths) == 0:
            ground_truths = None
        if ground_truths is not None and len(ground_truths) != len(trajectories):
            raise ValueError(f'ground_truths has {len(ground_truths)} entries for {len(trajectories)} trajectories')
        scores = []
        for index, trajectory in enumerate(trajectories):
            facts = facts_of(trajectory) if ground_truths is None else {'ground_truth': ground_truths[index]}
            scores.append(float(self.score(completion_of(trajectory, index), facts)))
        return scores

    def score(self, completion: str, facts: Dict[str, Any]) -> float:
        raise NotImplementedError


def completion_of(trajectory: Mapping[str, Any], index: int = 0) -> str:
    """The text of the last assistant message (the completion being judged)."""
    messages = trajectory.get('messages') if isinstance(trajectory, Mapping) else None
    if not messages:
        raise ValueError(f'trajectories[{index}] has no messages: a reward judges the last assistant message')
    last = messages[-1]
    if last.get('role') != 'assistant':
        raise ValueError(f'trajectories[{index}] ends with a {last.get("role")!r} message, not the assistant\'s '
                         f'completion')
    content = last.get('content')
    return content if isinstance(content, str) else ''


def facts_of(trajectory: Mapping[str, Any]) -> Dict[str, Any]:
    user_data = trajectory.get('user_data') or [{}]
    return dict(user_data[0]) if isinstance(user_data, (list, tuple)) else dict(user_data)


def required_fact(facts: Dict[str, Any], key: str, reward: str) -> Any:
    if key not in facts:
        raise ValueError(f'{reward}: the trajectory has no user_data[0][{key!r}] (and no ground_truths were given)')
    return facts[key]
