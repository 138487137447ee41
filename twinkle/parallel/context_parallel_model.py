"""Context parallelism applied to a Hugging Face model: sharded batches and an attention implementation.

``shard_batch(batch, mesh)`` runs once per micro-batch where the batch is built: it reads the
sequence boundaries (padding mask, position ids), lays out the zigzag shards, and keeps this
rank's tokens, their position ids (RoPE sees true positions) and their next-token targets
(``shift_labels``: the shift crosses shard boundaries, so it happens before sharding). The batch
then carries ``twinkle_context_parallel`` (the layout and the groups), which Hugging Face passes
down to every attention call, where ``twinkle_context_parallel`` attention (``HF_ATTENTION_NAME``)
runs ``context_parallel_attention``. No layer reads a tensor's values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from twinkle.utils.labels import IGNORE_INDEX, shifted_labels

from .context_parallel import context_parallel_attention
from .mesh import DeviceMesh
from .sequence_shards import SequenceShards, sequence_lengths, shard_sequences

HF_ATTENTION_NAME = 'twinkle_context_parallel'
BATCH_KEY = 'twinkle_context_parallel'
_DROPPED = ('attention_mask', 'labels', 'cu_seq_lens_q', 'cu_seq_lens_k', 'max_length_q', 'max_length_k')


@dataclass(frozen=True)
class ContextParallelBatch:
    """What attention needs about a sharded batch: its layout and the groups to exchange over."""

    shards: SequenceShards
    cp_group: Any = None
    ulysses_group: Any = None


def shard_batch(batch: Dict[str, Any], mesh: DeviceMesh, device: Optional[torch.device] = None,
                pad_token_id: int = 0) -> Dict[str, Any]:
    """This rank's part of a collated batch (``input_ids`` ``(rows, length)``, optional
    ``attention_mask`` padding on the right, ``position_ids``, ``labels``): ``input_ids``,
    ``position_ids`` and ``shift_labels`` of its shard, and ``twinkle_context_parallel``."""
    input_ids = batch['input_ids']
    rows, length = input_ids.shape
    lengths = sequence_lengths(rows, length, batch.get('attention_mask'), batch.get('position_ids'))
    shards = shard_sequences(lengths, length, cp=mesh.size('cp'), ulysses=mesh.size('ulysses'))
    rank = mesh.sequence_rank
    sharded = {key: value for key, value in batch.items() if key not in _DROPPED}
    sharded['input_ids'] = shards.shard(input_ids, rank, fill=pad_token_id)
    sharded['position_ids'] = shards.position_ids[rank].clone()
    if 'labels' in batch:
        sharded['shift_labels'] = shards.shard(shifted_labels(batch['labels']), rank, fill=IGNORE_INDEX)
    if device is not None:
        sharded = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                   for key, value in sharded.items()}
        shards = shards.to(device)
    sharded[BATCH_KEY] = ContextParallelBatch(shards, mesh.group('cp') if mesh.size('cp') > 1 else None,
                                              mesh.group('ulysses') if mesh.size('ulysses') > 1 else None)
    return sharded


def register_hf_attention() -> str:
    """Register ``twinkle_context_parallel`` with transformers (idempotent); returns the name. Its
    mask function is flash-attention's: no mask is built (the shards carry the boundaries)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(HF_ATTENTION_NAME, hf_context_parallel_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, flash_attention_mask)
    return HF_ATTENTION_NAME


def hf_context_parallel_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                                  dropout: float = 0.0, sliding_window: Optional[int] = None,
                                  twinkle_context_parallel: Optional[ContextParallelBatch] = None,
                                  **_) -> Tuple[torch.Tensor, None]:
    """Hugging Face's attention signature: ``query`` ``(rows, heads, local_length, dim)`` in,
    ``(rows, local_length, heads, dim)`` out, no attention weights."""
    if twinkle_context_parallel is None:
        raise ValueError(f'{HF_ATTENTION_NAME} attention needs a sharded batch: pass the model the output of '
                         f'twinkle.parallel.shard_batch (its {BATCH_KEY} entry), as TransformersModel does')
    if dropout:
        raise ValueError(f'{HF_ATTENTION_NAME} has no attention dropout; got dropout={dropout}')
    if sliding_window is not None:
        raise ValueError(f'{HF_ATTENTION_NAME} has no sliding window; got sliding_window={sliding_window}')
    if attention_mask is not None:
        raise ValueError(f'{HF_ATTENTION_NAME} takes no attention mask (the shards carry the sequence boundaries); '
                         f'got one of shape {tuple(attention_mask.shape)}')
    if not getattr(module, 'is_causal', True):
        raise ValueError(f'{HF_ATTENTION_NAME} is causal attention; {type(module).__name__} is not causal')
    batch = twinkle_context_parallel
    out = context_parallel_attention(*(t.transpose(1, 2) for t in (query, key, value)), batch.shards, scale=scaling,
                                     cp_group=batch.cp_group, ulysses_group=batch.ulysses_group)
    return out, None


__all__ = ['BATCH_KEY', 'ContextParallelBatch', 'HF_ATTENTION_NAME', 'hf_context_parallel_attention',
           'register_hf_attention', 'shard_batch']
