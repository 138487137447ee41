"""From what the user passes to ``forward_backward`` to the tensors the model call takes."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from twinkle.kernels.checks import check_batch

# Keys of a collated batch that Hugging Face causal LMs accept (the cu_seq_lens/max_length ones
# carry packed-sequence boundaries to varlen attention, twinkle_context_parallel a sharded batch's
# layout to context-parallel attention).
MODEL_INPUT_KEYS = ('input_ids', 'attention_mask', 'position_ids', 'cu_seq_lens_q', 'cu_seq_lens_k',
                    'max_length_q', 'max_length_k', 'twinkle_context_parallel')


def to_batches(inputs: Any, processor, template, device: torch.device,
               vocab_size: Optional[int] = None) -> Iterable[Dict[str, Any]]:
    """Collated micro-batches on ``device`` from a collated dict, or a list of features/trajectories.

    Their values (ids within ``vocab_size``, packed boundaries) are checked here, once per batch and
    before the move to the device, since the kernels no longer read values per call."""
    if isinstance(inputs, Mapping):
        batches = [_collated(inputs)]
    elif isinstance(inputs, Sequence) and not isinstance(inputs, str) and len(inputs) > 0:
        features = [_feature(i, row, template) for i, row in enumerate(inputs)]
        if processor is None:
            from twinkle.processor import InputProcessor
            processor = InputProcessor(pad_token_id=template.pad_token_id if template is not None else 0)
        batches = processor.micro_batches(features)
    else:
        raise ValueError(f'inputs must be a batch dict or a non-empty list of samples, got {type(inputs).__name__}')
    for batch in batches:
        check_batch(batch, vocab_size)
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in batches]


def model_inputs(batch: Dict[str, Any]) -> Dict[str, Any]:
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}


def _collated(batch: Mapping[str, Any]) -> Dict[str, Any]:
    if 'input_ids' not in batch:
        raise ValueError(f'the batch has no input_ids (keys: {sorted(batch)})')
    collated = {}
    for key, value in batch.items():
        if isinstance(value, list) and key in ('input_ids', 'labels', 'attention_mask', 'position_ids'):
            value = torch.tensor(value, dtype=torch.long)
            value = value.unsqueeze(0) if value.dim() == 1 else value
        collated[key] = value
    return collated


def _feature(index: int, row: Any, template) -> Dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f'sample {index} must be a dict, got {type(row).__name__}')
    if 'input_ids' in row:
        return dict(row)
    if 'messages' in row:
        if template is None:
            raise ValueError(f'sample {index} is a trajectory (messages) but no template is set: call set_template')
        return template.encode(row)
    raise ValueError(f'sample {index} has no input_ids (keys: {sorted(row)})')
