"""Metrics: accumulate over micro-batches and steps, then ``compute()`` plain numbers."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch

from twinkle.loss.base import IGNORE_INDEX, next_token_targets


class Metric:
    """``update(...)`` as batches go by, ``compute()`` -> dict of numbers, ``reset()`` to start over.
    ``all_reduce(sum_fn)`` makes the counts global over data-parallel ranks before ``compute``."""

    def update(self, **kwargs: Any) -> None:
        raise NotImplementedError

    def all_reduce(self, sum_fn) -> None:
        """Default: nothing to combine."""

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class LossMetric(Metric):
    """Token-weighted mean loss: sum of summed losses / sum of token counts."""

    def __init__(self):
        self.reset()

    def update(self, *, loss_sum: torch.Tensor, num_tokens: torch.Tensor, **_: Any) -> None:
        self.loss_sum += float(loss_sum.detach())
        self.tokens += int(num_tokens)

    def all_reduce(self, sum_fn) -> None:
        self.loss_sum, self.tokens = float(sum_fn(self.loss_sum)), int(sum_fn(self.tokens))

    def compute(self) -> Dict[str, float]:
        return {'loss': self.loss_sum / self.tokens if self.tokens else float('nan')}

    def reset(self) -> None:
        self.loss_sum, self.tokens = 0.0, 0


class Accuracy(Metric):
    """Next-token accuracy on the trained tokens; needs logits (a fused loss does not build them)."""

    def __init__(self):
        self.reset()

    def update(self, *, inputs: Dict[str, Any], outputs: Any, **_: Any) -> None:
        logits = getattr(outputs, 'logits', None)
        if logits is None or ('labels' not in inputs and 'shift_labels' not in inputs):
            return
        targets = next_token_targets(inputs).to(logits.device)
        trained = targets != IGNORE_INDEX
        self.correct += int((logits.argmax(-1)[trained] == targets[trained]).sum())
        self.total += int(trained.sum())

    def all_reduce(self, sum_fn) -> None:
        self.correct, self.total = int(sum_fn(self.correct)), int(sum_fn(self.total))

    def compute(self) -> Dict[str, float]:
        return {'accuracy': self.correct / self.total} if self.total else {}

    def reset(self) -> None:
        self.correct, self.total = 0, 0


class TrainMetric(Metric):
    """Optimisation progress: steps, learning rate, gradient norm, tokens and tokens/s."""

    def __init__(self):
        self.steps = 0
        self.reset()

    def update(self, *, num_tokens: Optional[torch.Tensor] = None, grad_norm: Optional[float] = None,
               lr: Optional[float] = None, stepped: bool = False, **_: Any) -> None:
        if num_tokens is not None:
            self.tokens += int(num_tokens)
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)
        if lr is not None:
            self.lr = lr
        self.steps += int(stepped)

    def all_reduce(self, sum_fn) -> None:
        self.tokens = int(sum_fn(self.tokens))

    def compute(self) -> Dict[str, float]:
        elapsed = time.perf_counter() - self.started
        figures = {'steps': self.steps, 'tokens': self.tokens,
                   'tokens_per_second': self.tokens / elapsed if elapsed > 0 else 0.0}
        if self.grad_norm is not None:
            figures['grad_norm'] = self.grad_norm
        if self.lr is not None:
            figures['lr'] = self.lr
        return figures

    def reset(self) -> None:
        self.tokens, self.grad_norm, self.lr = 0, None, None
        self.started = time.perf_counter()


class CompletionRewardMetric(Metric):
    """Sampled completions of an RL step: mean / std / min / max of each named reward and of the
    completion lengths (tokens). The seeds call ``accumulate(completion_lengths=, rewards={name:
    list})`` and ``calculate()``; ``update``/``compute`` are the same for the Metric protocol."""

    def __init__(self):
        self.reset()

    def accumulate(self, inputs: Any = None, outputs: Any = None, *, completion_lengths=None,
                   rewards: Optional[Dict[str, Any]] = None, **_: Any) -> None:
        lengths = [] if completion_lengths is None else [float(n) for n in completion_lengths]
        columns = {name: [float(v) for v in values] for name, values in (rewards or {}).items()}
        for name, values in columns.items():  # all checked before any is kept: no half-recorded step
            if lengths and len(values) != len(lengths):
                raise ValueError(f'rewards[{name!r}] has {len(values)} values for {len(lengths)} completion_lengths')
        for name, values in columns.items():
            self.rewards.setdefault(name, []).extend(values)
        self.lengths.extend(lengths)

    update = accumulate

    def calculate(self) -> Dict[str, float]:
        figures: Dict[str, float] = {}
        for name, values in [('completion_length', self.lengths)] + [(f'reward/{k}', v) for k, v in self.rewards.items()]:
            if values:
                column = torch.tensor(values, dtype=torch.float64)
                figures.update({f'{name}/mean': column.mean().item(), f'{name}/min': column.min().item(),
                                f'{name}/max': column.max().item(),
                                f'{name}/std': column.std().item() if len(values) > 1 else 0.0})
        return figures

    compute = calculate

    def reset(self) -> None:
        self.lengths: list = []
        self.rewards: Dict[str, list] = {}


__all__ = ['Accuracy', 'CompletionRewardMetric', 'LossMetric', 'Metric', 'TrainMetric']
