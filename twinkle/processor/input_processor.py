"""InputProcessor: a list of InputFeatures -> the tensors a causal LM trains on.

Two layouts:
- padded: ``(batch, longest)`` tensors, pads on the right or left, ``attention_mask`` marks them;
- padding-free: every sample concatenated into one ``(1, total)`` row with ``position_ids``
  restarting at 0 per sample and ``cu_seq_lens_q/k`` (cumulative sample lengths, the names
  Hugging Face's varlen attention paths read); no compute is spent on pads at all.

Either way the label of each sample's first token is masked: Hugging Face shifts labels inside
the loss, so in a packed row that label would be predicted from the previous sample's last token.
Rows that are already packed (``PackingDataset``) are split into samples by their position_ids.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from twinkle.template import IGNORE_INDEX

PADDING_SIDES = ('right', 'left')


class InputProcessor:
    """Collates features (``__call__``) or splits them into collated micro-batches (``micro_batches``).

    Args:
        padding_free: concatenate samples instead of padding them.
        padding_side: 'right' or 'left' (padded layout).
        pad_token_id: id written into pads (they are masked, so any valid id works).
        micro_batch_size: features per micro-batch in ``micro_batches`` (None: all in one).
    """

    def __init__(self, padding_free: bool = False, padding_side: str = 'right', pad_token_id: int = 0,
                 micro_batch_size: Optional[int] = None):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f'padding_side must be one of {PADDING_SIDES}, got {padding_side!r}')
        if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
            raise ValueError(f'micro_batch_size must be a positive int or None, got {micro_batch_size!r}')
        self.padding_free = padding_free
        self.padding_side = padding_side
        self.pad_token_id = pad_token_id
        self.micro_batch_size = micro_batch_size

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        rows = [_row_tensors(i, feature) for i, feature in enumerate(_checked(features))]
        return self._concatenated(rows) if self.padding_free else self._padded(rows)

    def micro_batches(self, features: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
        features = _checked(features)
        size = self.micro_batch_size or len(features)
        return [self(features[start:start + size]) for start in range(0, len(features), size)]

    def _padded(self, rows: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        longest = max(len(row['input_ids']) for row in rows)
        pads = {'input_ids': self.pad_token_id, 'labels': IGNORE_INDEX, 'position_ids': 0, 'attention_mask': 0}
        batch = {}
        for key, pad in pads.items():
            padded = torch.full((len(rows), longest), pad, dtype=torch.long)
            for i, row in enumerate(rows):
                n = len(row[key])
                if self.padding_side == 'right':
                    padded[i, :n] = row[key]
                elif n:
                    padded[i, -n:] = row[key]
            batch[key] = padded
        return batch

    def _concatenated(self, rows: List[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
        batch = {key: torch.cat([row[key] for row in rows])[None] for key in ('input_ids', 'labels', 'position_ids')}
        starts = (batch['position_ids'][0] == 0).nonzero().flatten()
        total = batch['input_ids'].shape[1]
        cu_seq_lens = torch.cat([starts, torch.tensor([total])]).to(torch.int32)
        longest = int(cu_seq_lens.diff().max()) if total else 0
        return {**batch, 'cu_seq_lens_q': cu_seq_lens, 'cu_seq_lens_k': cu_seq_lens,
                'max_length_q': longest, 'max_length_k': longest}


def _checked(features: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    if isinstance(features, dict) or not isinstance(features, Sequence) or not features:
        raise ValueError('features must be a non-empty list of InputFeature dicts')
    return list(features)


def _row_tensors(index: int, feature: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """One feature as 1-D tensors, sample-start labels masked (see the module docstring)."""
    if not isinstance(feature, dict) or 'input_ids' not in feature:
        raise ValueError(f'features[{index}] has no input_ids (encode the dataset first)')
    input_ids = torch.as_tensor(feature['input_ids'], dtype=torch.long)
    n = len(input_ids)
    row = {'input_ids': input_ids,
           'labels': torch.as_tensor(feature.get('labels', [IGNORE_INDEX] * n), dtype=torch.long).clone(),
           'position_ids': torch.as_tensor(feature.get('position_ids', range(n)), dtype=torch.long),
           'attention_mask': torch.ones(n, dtype=torch.long)}
    for key in ('labels', 'position_ids'):
        if len(row[key]) != n:
            raise ValueError(f'features[{index}]: {key} has {len(row[key])} entries, input_ids has {n}')
    if n and row['position_ids'][0] != 0:
        raise ValueError(f'features[{index}]: position_ids must start at 0 (they restart at 0 per sample)')
    row['labels'][row['position_ids'] == 0] = IGNORE_INDEX
    return row
