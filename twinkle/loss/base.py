"""The loss interface every training objective implements."""
from __future__ import annotations

from typing import Any, Mapping, Tuple

import torch

from twinkle.utils.labels import IGNORE_INDEX, shifted_labels

__all__ = ['IGNORE_INDEX', 'Loss', 'count_tokens', 'next_token_targets', 'shifted_labels']


class Loss:
    """Subclasses implement ``__call__(inputs, outputs) -> (loss_sum, num_tokens)``.

    ``inputs`` is the collated batch (``input_ids``, ``labels``, ...); ``outputs`` the model's
    output. A loss that can be computed inside the model's forward without logits (fused linear
    cross-entropy) sets ``model_computes_loss = True``: the adapter then passes the labels to the
    model and the loss reads ``outputs.loss``, a sum over tokens.
    ``model_computes_logps = True`` (the RL losses): the adapter asks a kernelized model for the
    log-probs of the trained tokens through fused linear log-probs (``outputs.logps``, no logits);
    the loss then needs a ``temperature`` attribute.
    """

    model_computes_loss = False
    model_computes_logps = False

    def __call__(self, inputs: Mapping[str, Any], outputs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def count_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (shifted_labels(labels) != IGNORE_INDEX).sum()


def next_token_targets(inputs: Mapping[str, Any]) -> torch.Tensor:
    """The label each position predicts: the batch's ``shift_labels`` when it carries them (a
    sequence-sharded batch, shifted before sharding: the next token may sit on another rank), else
    its ``labels`` shifted."""
    if isinstance(inputs, Mapping) and inputs.get('shift_labels') is not None:
        return inputs['shift_labels']
    labels = inputs.get('labels') if isinstance(inputs, Mapping) else None
    if labels is None:
        raise ValueError('the batch has no labels: the cross-entropy loss needs them')
    return shifted_labels(labels)
