"""DPO (Rafailov et al. 2023) and its IPO variant: preference losses over (chosen, rejected) pairs.

Convention: the samples come in pairs, ``inputs[2k]`` the chosen and ``inputs[2k + 1]`` the rejected
completion of prompt ``k`` (TRL concatenates the two halves instead; pairs side by side keep a pair
inside one micro-batch whenever ``micro_batch_size`` is even). ``ref_logps`` is the reference model's
log-prob per trained token, as for the policy losses (``token_inputs.py``). The loss returns (sum over
pairs, number of pairs), so micro-batches and data ranks accumulate exactly.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from .base import Loss
from .policy_gradient import sequence_sums, token_logps

LOSS_TYPES = ('sigmoid', 'ipo')


class DPOLoss(Loss):
    """'sigmoid' (DPO, with conservative label smoothing from cDPO):
    ``-(1 - ls) logsigmoid(beta m) - ls logsigmoid(-beta m)``, m = (pi_c - pi_r) - (ref_c - ref_r) of
    the completions' summed log-probs; 'ipo' (Azar et al. 2023): ``(m - 1 / (2 beta))^2`` of the
    length-averaged log-probs, as in the IPO paper."""

    model_computes_logps = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = 'sigmoid',
                 temperature: float = 1.0):
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f'beta must be a finite number > 0, got {beta!r}')
        if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 0.5:
            raise ValueError(f'label_smoothing must be in [0, 0.5), got {label_smoothing!r}')
        if loss_type not in LOSS_TYPES:
            raise ValueError(f'loss_type must be one of {LOSS_TYPES}, got {loss_type!r}')
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f'temperature must be > 0, got {temperature!r}')
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        self.loss_type, self.temperature = loss_type, float(temperature)

    def __call__(self, inputs, outputs) -> Tuple[torch.Tensor, torch.Tensor]:
        extra = inputs.get('loss_inputs') if hasattr(inputs, 'get') else None
        if extra is None or 'ref_logps' not in extra:
            raise ValueError('DPOLoss needs ref_logps=: forward_backward(inputs=[chosen, rejected, ...], '
                             'ref_logps=[the reference model\'s log-prob per trained token, per sample])')
        logps = token_logps(outputs, inputs, self.temperature)
        policy, reference = self._pair_logps(logps, extra)
        margin = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
        if self.loss_type == 'ipo':
            losses = (margin - 1 / (2 * self.beta)) ** 2
        else:
            losses = (-(1 - self.label_smoothing) * F.logsigmoid(self.beta * margin)
                      - self.label_smoothing * F.logsigmoid(-self.beta * margin))
        return losses.sum(), torch.tensor(len(losses), device=logps.device)

    def _pair_logps(self, logps: torch.Tensor, extra) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per pair, [chosen, rejected] of the policy's and the reference's sequence log-probs."""
        sequences, ids = extra['sequence_ids'].unique(return_inverse=True)
        chosen, rejected = sequences[0::2], sequences[1::2]
        if len(sequences) % 2 or (chosen % 2).any() or (rejected != chosen + 1).any():
            raise ValueError(f'DPOLoss needs whole (chosen, rejected) pairs in each micro-batch: inputs[2k] chosen, '
                             f'inputs[2k+1] rejected, each with trained tokens, and an even micro_batch_size; '
                             f'this micro-batch holds samples {sequences.tolist()}')
        policy = sequence_sums(logps, ids, len(sequences), mean=self.loss_type == 'ipo')
        reference = sequence_sums(extra['ref_logps'].to(logps.dtype), ids, len(sequences),
                                  mean=self.loss_type == 'ipo')
        return policy.view(-1, 2), reference.view(-1, 2)
