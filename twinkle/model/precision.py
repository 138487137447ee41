"""Which dtypes and attention a model trains with, asked of the device layer at load time.

- bf16 where the device has it: weights loaded in bf16, forward under bf16 autocast (so fp32
  LoRA adapters mix in), no loss scaling.
- fp16 on GPUs without bf16 (T4/V100): fp32 master weights, fp16 autocast and a gradient scaler;
  pure fp16 weights under AdamW lose updates below fp16's resolution.
- fp32 on CPU unless asked (``TWINKLE_CPU_DTYPE=bf16`` or ``mixed_precision='bf16'``).
Flash-attention 2 only where installed and supported (sm80+, half precision), else SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from twinkle.backends import Backend

PRECISIONS = ('auto', 'bf16', 'fp16', 'fp32')
ATTENTIONS = ('auto', 'flash_attention_2', 'sdpa', 'eager')


@dataclass(frozen=True)
class Precision:
    name: str                              # 'bf16' | 'fp16' | 'fp32'
    param_dtype: torch.dtype               # dtype the weights are loaded in
    autocast_dtype: Optional[torch.dtype]  # forward autocast, None for plain fp32
    use_grad_scaler: bool
    reason: str


def choose_precision(device: Backend, mixed_precision: str = 'auto') -> Precision:
    if mixed_precision not in PRECISIONS:
        raise ValueError(f'mixed_precision must be one of {PRECISIONS}, got {mixed_precision!r}')
    if mixed_precision == 'auto':
        default = device.default_dtype()
        name = {torch.bfloat16: 'bf16', torch.float16: 'fp16'}.get(default, 'fp32')
        reason = f'auto: {device.type} default dtype is {name}'
        if name == 'fp16':
            reason += ' (no bf16 on this device)'
    else:
        name, reason = mixed_precision, 'asked for'
        if name == 'bf16' and not device.supports_bf16:
            raise ValueError(f'mixed_precision="bf16" but {device.device_name} has no bf16; use "fp16" or "auto"')
    if name == 'bf16':
        return Precision('bf16', torch.bfloat16, torch.bfloat16, False, reason)
    if name == 'fp16':
        return Precision('fp16', torch.float32, torch.float16, True, reason)
    return Precision('fp32', torch.float32, None, False, reason)


def choose_attention(device: Backend, precision: Precision, attn_implementation: str = 'auto') -> Tuple[str, str]:
    """(implementation, reason). Flash-attention 2 needs the package, sm80+ and half precision."""
    if attn_implementation not in ATTENTIONS:
        return attn_implementation, 'asked for'  # a custom registered implementation
    flash_ok = device.has_flash_attn and precision.name in ('bf16', 'fp16')
    if attn_implementation == 'flash_attention_2' and not flash_ok:
        why = 'needs half precision' if device.has_flash_attn else f'{device.device_name} has no flash-attn 2'
        raise ValueError(f'attn_implementation="flash_attention_2" cannot run: {why}; use "sdpa"')
    if attn_implementation != 'auto':
        return attn_implementation, 'asked for'
    if flash_ok:
        return 'flash_attention_2', 'auto: flash-attn 2 installed and supported'
    return 'sdpa', f'auto: flash-attn 2 unavailable on {device.type} or in {precision.name}'
