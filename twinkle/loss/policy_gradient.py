"""Clipped policy-gradient losses of group-sampled RL: GRPO (and its normalisations), GSPO, CISPO.

Each reads the policy's log-probs of the trained tokens (from the logits, fp32) and the batch's
``loss_inputs`` (``token_inputs.py``: old log-probs, advantages, reference log-probs per token),
and returns (sum, count) like every twinkle loss, so accumulation over micro-batches and data
ranks stays exact: per-token losses with the token count (token-level normalisation), or
per-sequence means with the sequence count (sequence-level). Without ``old_logps`` the step is
on-policy: old = the current log-probs, detached (ratio 1, as TRL with one iteration per batch).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .base import IGNORE_INDEX, Loss
from .token_inputs import trained_mask

LOSS_TYPES = ('grpo', 'bnpo', 'dr_grpo', 'dapo')


class _PolicyLoss(Loss):
    model_computes_logps = True

    def __init__(self, epsilon: float = 0.2, epsilon_high: Optional[float] = None, beta: float = 0.0,
                 temperature: float = 1.0):
        for name, value in (('epsilon', epsilon), ('beta', beta), ('temperature', temperature)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f'{name} must be a finite number >= 0, got {value!r}')
        if temperature == 0:
            raise ValueError('temperature must be > 0 (the sampler\'s, so log-probs match)')
        if epsilon_high is not None and (not isinstance(epsilon_high, (int, float)) or epsilon_high < 0):
            raise ValueError(f'epsilon_high must be None or a number >= 0, got {epsilon_high!r}')
        self.epsilon, self.beta, self.temperature = float(epsilon), float(beta), float(temperature)
        self.epsilon_high = float(epsilon if epsilon_high is None else epsilon_high)

    def __call__(self, inputs, outputs) -> Tuple[torch.Tensor, torch.Tensor]:
        extra = inputs.get('loss_inputs') if hasattr(inputs, 'get') else None
        if extra is None or 'advantages' not in extra:
            raise ValueError(f'{type(self).__name__} needs advantages=: forward_backward(inputs=..., advantages=[one '
                             f'per sample], old_logps=[per trained token, per sample])')
        if self.beta > 0 and 'ref_logps' not in extra:
            raise ValueError(f'{type(self).__name__}(beta={self.beta}) needs ref_logps= (the reference model\'s '
                             f'log-probs of the trained tokens) for its KL term')
        logps = token_logps(outputs, inputs, self.temperature)
        old = extra.get('old_logps', logps.detach())
        return self.reduce(logps, old.to(logps.dtype), extra['advantages'].to(logps.dtype), extra)

    def kl(self, logps: torch.Tensor, extra) -> torch.Tensor:
        """k3 estimator of KL(policy || reference) per token (Schulman): exp(d) - d - 1, d = ref - logp."""
        if self.beta == 0:
            return torch.zeros_like(logps)
        delta = extra['ref_logps'].to(logps.dtype) - logps
        return self.beta * (delta.exp() - delta - 1)

    def reduce(self, logps, old, advantages, extra) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class GRPOLoss(_PolicyLoss):
    """PPO's clipped surrogate per token, ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta KL``.

    ``loss_type`` (TRL's GRPOTrainer definitions): 'grpo' each sequence's token mean, averaged over
    sequences (DeepSeekMath); 'bnpo' and 'dapo' the mean over all trained tokens of the batch (DAPO's
    token-level normalisation; here both are global over micro-batches and data ranks, where TRL's
    bnpo is per local batch); 'dr_grpo' the token sum over sequences x ``max_completion_length``
    (Dr. GRPO: no length bias)."""

    def __init__(self, epsilon: float = 0.2, epsilon_high: Optional[float] = None, beta: float = 0.0,
                 loss_type: str = 'grpo', max_completion_length: Optional[int] = None, temperature: float = 1.0):
        super().__init__(epsilon, epsilon_high, beta, temperature)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f'loss_type must be one of {LOSS_TYPES}, got {loss_type!r}')
        if loss_type == 'dr_grpo' and (not isinstance(max_completion_length, int) or max_completion_length < 1):
            raise ValueError("loss_type='dr_grpo' needs max_completion_length= (a positive int, the sampler's "
                             "max_tokens): its normaliser")
        self.loss_type, self.max_completion_length = loss_type, max_completion_length

    def reduce(self, logps, old, advantages, extra):
        ratio = (logps - old).exp()
        clipped = ratio.clamp(1 - self.epsilon, 1 + self.epsilon_high)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages) + self.kl(logps, extra)
        sequence_ids = extra['sequence_ids']
        if self.loss_type in ('bnpo', 'dapo'):
            return per_token.sum(), torch.tensor(per_token.numel(), device=per_token.device)
        sequences, ids = sequence_ids.unique(return_inverse=True)
        if self.loss_type == 'dr_grpo':
            return per_token.sum(), torch.tensor(len(sequences) * self.max_completion_length, device=per_token.device)
        return sequence_sums(per_token, ids, len(sequences), mean=True).sum(), torch.tensor(len(sequences),
                                                                                   device=per_token.device)


class GSPOLoss(_PolicyLoss):
    """GSPO (Zheng et al. 2025): the sequence-level ratio s = exp(mean_t(logp - old)) clipped,
    ``-min(s A, clip(s, 1 - eps, 1 + eps_high) A)`` per sequence, averaged over sequences; the KL
    term (beta > 0) is added as a per-sequence token mean."""

    def __init__(self, epsilon: float = 3e-4, epsilon_high: Optional[float] = 4e-4, beta: float = 0.0,
                 temperature: float = 1.0):
        super().__init__(epsilon, epsilon_high, beta, temperature)

    def reduce(self, logps, old, advantages, extra):
        sequences, ids = extra['sequence_ids'].unique(return_inverse=True)
        count = len(sequences)
        ratio = sequence_sums(logps - old, ids, count, mean=True).exp()
        advantage = sequence_sums(advantages, ids, count, mean=True)  # constant within a sequence
        clipped = ratio.clamp(1 - self.epsilon, 1 + self.epsilon_high)
        per_sequence = -torch.minimum(ratio * advantage, clipped * advantage)
        per_sequence = per_sequence + sequence_sums(self.kl(logps, extra), ids, count, mean=True)
        return per_sequence.sum(), torch.tensor(count, device=logps.device)


class CISPOLoss(_PolicyLoss):
    """CISPO (MiniMax-M1): REINFORCE weighted by the clipped, detached importance ratio,
    ``-sg(clip(r, 1 - eps, 1 + eps_high)) A logp`` per token, token-level normalisation; by
    default no lower clip (``epsilon`` = inf-like 1.0 keeps r >= 0) as in the paper."""

    def __init__(self, epsilon: float = 1.0, epsilon_high: Optional[float] = 0.28, beta: float = 0.0,
                 temperature: float = 1.0):
        super().__init__(epsilon, epsilon_high, beta, temperature)

    def reduce(self, logps, old, advantages, extra):
        weight = (logps - old).exp().clamp(1 - self.epsilon, 1 + self.epsilon_high).detach()
        per_token = -weight * advantages * logps + self.kl(logps, extra)
        return per_token.sum(), torch.tensor(per_token.numel(), device=logps.device)


def token_logps(outputs, batch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (fp32) of the trained tokens, flattened in order (the order of ``loss_inputs``):
    the model's fused ``outputs.logps`` when it computed them, else from its logits."""
    mask = trained_mask(batch)
    fused = getattr(outputs, 'logps', None)
    if fused is not None:
        return fused[mask.to(fused.device)]
    logits = getattr(outputs, 'logits', None)
    if logits is None:
        raise ValueError('the policy losses need the logits or fused log-probs (the model returned neither)')
    selected = logits[mask].float() / temperature
    return selected.log_softmax(-1).gather(-1, logps_targets(batch)[mask][:, None])[:, 0]


def logps_targets(batch) -> torch.Tensor:
    """Next-token ids whose log-probs the losses read (``IGNORE_INDEX`` elsewhere): what a model
    computing fused log-probs is asked for."""
    targets = torch.full_like(batch['labels'], IGNORE_INDEX)
    targets[..., :-1] = batch['labels'][..., 1:]
    return targets.masked_fill(~trained_mask(batch), IGNORE_INDEX)


def sequence_sums(values: torch.Tensor, ids: torch.Tensor, count: int, mean: bool = False) -> torch.Tensor:
    """Per sequence (``ids``: each token's sequence, 0..count-1), the sum or the mean of its values."""
    sums = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, ids, values)
    if not mean:
        return sums
    sizes = torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, ids, torch.ones_like(values))
    return sums / sizes
