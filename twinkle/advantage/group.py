"""GRPO's group-normalised advantage and RLOO's leave-one-out baseline."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

SCALES = ('group', 'batch', 'none')
STD_EPSILON = 1e-4  # as TRL's GRPOTrainer: std + 1e-4 in the denominator, so a near-tie cannot explode


class _GroupAdvantage:
    def __call__(self, rewards: Union[Sequence[float], torch.Tensor], num_generations: int = 1,
                 scale: str = 'group') -> torch.Tensor:
        table = _grouped(rewards, num_generations)
        if scale not in SCALES:
            raise ValueError(f'scale must be one of {SCALES}, got {scale!r}')
        return self._advantages(table, scale).reshape(-1)

    def _advantages(self, table: torch.Tensor, scale: str) -> torch.Tensor:
        raise NotImplementedError


class GRPOAdvantage(_GroupAdvantage):
    """``(r - mean_group(r)) / (std + 1e-4)``: std of the group (``scale='group'``, DeepSeekMath's
    GRPO), of the whole batch (``'batch'``, as REINFORCE++ / Dr. GRPO recommend against per-group
    difficulty bias) or none (``'none'``). std is the sample standard deviation (Bessel-corrected,
    torch's default, as TRL); a group of one has std 0."""

    def _advantages(self, table: torch.Tensor, scale: str) -> torch.Tensor:
        centred = table - table.mean(dim=1, keepdim=True)
        if scale == 'none':
            return centred
        std = _std(table) if scale == 'group' else _std(table.reshape(1, -1)).expand_as(table[:, :1])
        return torch.where(std > 0, centred / (std + STD_EPSILON), torch.zeros_like(centred))


class RLOOAdvantage(_GroupAdvantage):
    """REINFORCE leave-one-out: ``r_i - mean_{j != i} r_j`` = ``N / (N - 1) (r_i - mean(r))``
    (Ahmadian et al. 2024); ``scale`` as GRPOAdvantage's, applied after. Needs N >= 2."""

    def _advantages(self, table: torch.Tensor, scale: str) -> torch.Tensor:
        count = table.shape[1]
        if count < 2:
            raise ValueError('RLOOAdvantage needs num_generations >= 2 (the baseline leaves one out)')
        baseline = (table.sum(dim=1, keepdim=True) - table) / (count - 1)
        advantages = table - baseline
        if scale == 'none':
            return advantages
        std = _std(table) if scale == 'group' else _std(table.reshape(1, -1)).expand_as(table[:, :1])
        return torch.where(std > 0, advantages / (std + STD_EPSILON), torch.zeros_like(advantages))


def _std(table: torch.Tensor) -> torch.Tensor:
    if table.shape[1] < 2:
        return torch.zeros_like(table[:, :1])
    return table.std(dim=1, keepdim=True)


def _grouped(rewards, num_generations) -> torch.Tensor:
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
        raise ValueError(f'num_generations must be a positive int, got {num_generations!r}')
    values = torch.as_tensor(rewards.tolist() if isinstance(rewards, torch.Tensor) else list(rewards),
                             dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f'rewards must be a flat sequence of numbers, got shape {tuple(values.shape)}')
    bad = [index for index, value in enumerate(values.tolist()) if not math.isfinite(value)]
    if bad:
        raise ValueError(f'rewards must be finite; not at indices {bad[:5]}')
    if values.numel() % num_generations:
        raise ValueError(f'num_generations={num_generations} does not divide the {values.numel()} rewards')
    return values.reshape(-1, num_generations).float()
