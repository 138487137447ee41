"""Per-sample RL inputs (old log-probs per completion token, one advantage per sample) laid onto
the tokens the loss sees.

Convention (the seeds'): ``old_logps[i]`` / ``ref_logps[i]`` list one value per *trained* token of
sample ``i`` (its positions whose label is not -100, in order; for a sampler's
``new_input_feature`` that is its completion), ``advantages[i]`` one number per sample. Every
collated layout the processor makes keeps samples and their tokens in order (padded rows
row-major, packed rows concatenated), so the k-th trained token of a micro-batch is the k-th of
the flattened per-sample lists: the values are handed out to micro-batches by count, no position
is re-derived per layer.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch

from twinkle.utils.labels import IGNORE_INDEX

PER_TOKEN = ('old_logps', 'ref_logps')
PER_SAMPLE = ('advantages',)
LOSS_INPUTS = PER_TOKEN + PER_SAMPLE


def token_inputs(samples: Sequence[Any], loss_inputs: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Flat per-token tensors (in sample order) of the given loss inputs, plus ``sequence_ids``."""
    unknown = sorted(set(loss_inputs) - set(LOSS_INPUTS))
    if unknown:
        raise ValueError(f'forward_backward got unknown loss inputs {unknown}; known: {", ".join(LOSS_INPUTS)}')
    if not isinstance(samples, list):
        raise ValueError(f'{", ".join(loss_inputs)} need inputs as a list of encoded samples (dicts with labels)')
    counts = [_trained_tokens(index, sample) for index, sample in enumerate(samples)]
    flat: Dict[str, torch.Tensor] = {'sequence_ids': torch.repeat_interleave(
        torch.arange(len(samples)), torch.tensor(counts, dtype=torch.long))}
    for name, values in loss_inputs.items():
        if values is None:
            continue
        if len(values) != len(samples):
            raise ValueError(f'{name} has {len(values)} entries for {len(samples)} samples')
        if name in PER_SAMPLE:
            flat[name] = torch.repeat_interleave(torch.tensor([float(v) for v in values]),
                                                 torch.tensor(counts, dtype=torch.long))
            continue
        for index, (row, count) in enumerate(zip(values, counts)):
            if len(row) != count:
                raise ValueError(f'{name}[{index}] has {len(row)} values for the {count} trained tokens of sample '
                                 f'{index} (one per label that is not -100, in order)')
        flat[name] = torch.tensor([float(v) for row in values for v in row])
    return flat


def hand_out(flat: Dict[str, torch.Tensor], batches: List[Dict[str, Any]]) -> None:
    """Give each batch (in order) its share of the flat per-token values, as ``batch['loss_inputs']``."""
    start = 0
    for batch in batches:
        if 'shift_labels' in batch:
            raise NotImplementedError('RL loss inputs with context parallelism (sequence-sharded batches) are not '
                                      'built yet; use cp_size = ulysses_size = 1')
        count = int(trained_mask(batch).sum())
        device = batch['labels'].device
        batch['loss_inputs'] = {name: values[start:start + count].to(device) for name, values in flat.items()}
        start += count
    if start != len(flat['sequence_ids']):
        raise RuntimeError(f'{start} trained tokens in the batches, {len(flat["sequence_ids"])} in the samples')


def trained_mask(batch: Dict[str, Any]) -> torch.Tensor:
    """Which next-token positions are trained, in the flattened order the values follow."""
    labels = batch['labels']
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    if 'cu_seq_lens_q' in batch:  # packed: the last token of each sequence predicts nothing
        ends = batch['cu_seq_lens_q'][1:].long() - 1
        shifted.view(-1)[ends] = IGNORE_INDEX
    return shifted != IGNORE_INDEX


def _trained_tokens(index: int, sample: Any) -> int:
    labels = sample.get('labels') if isinstance(sample, Mapping) else None
    if labels is None:
        raise ValueError(f'inputs[{index}] has no labels: RL loss inputs align to its trained (labelled) tokens; '
                         f'pass encoded features such as a sampler\'s new_input_feature')
    labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    return sum(label != IGNORE_INDEX for label in labels[1:])
