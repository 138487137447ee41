"""The training loss of a Hugging Face causal LM through fused linear cross-entropy.

Stock ``*ForCausalLM.forward`` builds the (batch, seq, vocab) logits and then their fp32 copy
for the loss: with Qwen's 152k vocabulary that is the largest activation of a training step.
``TwinkleCausalLMLoss`` runs the stock forward unchanged except that it asks for logits at no
position, catches the decoder's last hidden states, and computes the loss from them and
``lm_head.weight`` without logits. Model-specific extras of the stock forward (router aux loss
of MoE models) are kept. Logits are still built when asked for (``skip_logits=False``), in eval
mode, or when the head is neither a plain ``nn.Linear`` nor a LoRA-wrapped one.

A LoRA adapter on lm_head stays fused, exactly: ``h W^T + s (A x) B^T`` with ``x = dropout(h)`` is
one linear map of the widened input ``[h, s A x]`` by the widened weight ``[W, B]`` (vocab x
(hidden + r)), so fused linear cross-entropy takes it as it is; autograd reaches A and B through the
concatenations. Only a rank-r column block is added, never the logits.

RL losses ask for log-probs instead (``logps_of=`` next-token targets, ``logps_temperature=``):
the same capture feeds fused linear log-probs, ``outputs.logps`` holds each target's log-prob (0
where ignored) and ``outputs.logits`` is None, so an RL step keeps the memory of an SFT step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from twinkle.utils.labels import IGNORE_INDEX, shifted_labels
from twinkle.utils.logger import get_logger

logger = get_logger(__name__)

CAPTURE = '_twinkle_last_hidden'


class TwinkleCausalLMLoss(nn.Module):
    """Mixed in front of a ``*ForCausalLM`` class by ``kernelize``; keeps its signature."""

    def forward(self, *args, labels: Optional[torch.Tensor] = None, skip_logits: Optional[bool] = None,
                **kwargs):
        shift_labels = kwargs.pop('shift_labels', None)
        logps_of = kwargs.pop('logps_of', None)
        logps_temperature = kwargs.pop('logps_temperature', 1.0)
        if logps_of is not None:
            return self._forward_logps(args, kwargs, logps_of, logps_temperature)
        wants_loss = labels is not None or shift_labels is not None
        if skip_logits is None:
            skip_logits = self.training and wants_loss
        if not (skip_logits and wants_loss and self._head_is_fusable(kwargs)):
            if shift_labels is not None:
                kwargs['shift_labels'] = shift_labels
            return super().forward(*args, labels=labels, **kwargs)

        outputs, hidden = self._forward_to_hidden(args, kwargs)
        if shift_labels is None:
            shift_labels = shifted_labels(labels)
        outputs.loss = self._fused_loss(hidden, shift_labels, kwargs.get('num_items_in_batch'))
        aux_loss = getattr(outputs, 'aux_loss', None)
        if aux_loss is not None:
            outputs.loss = outputs.loss + self.router_aux_loss_coef * aux_loss.to(outputs.loss.device)
        return outputs

    def _forward_logps(self, args, kwargs, targets: torch.Tensor, temperature: float):
        """Log-probs of ``targets`` (next-token ids, ``IGNORE_INDEX`` where not wanted) without logits;
        the stock logits when the head cannot be fused (the caller's loss then reads those)."""
        kwargs.pop('num_items_in_batch', None)
        if not (self._head_is_fusable(kwargs) and self._head_has_no_bias_or_softcap()):
            return super().forward(*args, **kwargs)
        from .fused_linear_logprobs import fused_linear_logprobs
        outputs, hidden = self._forward_to_hidden(args, kwargs)
        hidden, weight, _ = self._head_operands(hidden)
        logps = fused_linear_logprobs(hidden, weight, targets.to(hidden.device), temperature=temperature,
                                      ignore_index=IGNORE_INDEX)
        kept = {key: value for key, value in outputs.items() if key != 'logits'}  # the empty logits of no position
        return _with_logps(type(outputs))(**kept, logps=logps)

    def _forward_to_hidden(self, args, kwargs):
        """The stock forward with logits at no position; returns (outputs, the decoder's last hidden states)."""
        capture = self._last_hidden_capture()
        capture['active'] = True
        no_position = torch.empty(0, dtype=torch.long, device=self.lm_head.weight.device)
        try:
            outputs = super().forward(*args, labels=None, logits_to_keep=no_position, **kwargs)
        finally:
            capture['active'] = False
        outputs.logits = None
        return outputs, capture.pop('hidden')

    def after_replacing(self) -> None:
        """Called by ``kernelize`` once the class is swapped in: the decoder's last hidden states are caught
        by a hook installed now, once. Registering it per call would break a torch.compile graph
        (a hook handle is global state dynamo cannot trace)."""
        self._last_hidden_capture()

    def _last_hidden_capture(self) -> dict:
        """The decoder's capture slot (kept on the decoder, which its hook receives: a deepcopy of the model
        gets its own slot)."""
        decoder = self.get_decoder()
        if CAPTURE not in decoder.__dict__:
            decoder.__dict__[CAPTURE] = {'active': False}
            decoder.register_forward_hook(_keep_last_hidden)
        return decoder.__dict__[CAPTURE]

    def _fused_loss(self, hidden, shift_labels, num_items_in_batch):
        from .fused_linear_cross_entropy import fused_linear_cross_entropy
        reduction = 'mean' if num_items_in_batch is None else 'sum'
        hidden, weight, bias = self._head_operands(hidden)
        loss = fused_linear_cross_entropy(
            hidden, weight, shift_labels.to(hidden.device), bias=bias,
            ignore_index=IGNORE_INDEX, reduction=reduction,
            logit_softcap=getattr(self.config, 'final_logit_softcapping', None))
        return loss if num_items_in_batch is None else loss / num_items_in_batch

    def _head_operands(self, hidden):
        """``(hidden, weight, bias)`` of lm_head as one linear map, in the dtype its matmul would run in."""
        hidden, weight, bias = _widened_head(self.lm_head, hidden)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):  # what autocast would have done to lm_head's matmul
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return hidden, weight, bias

    def _head_has_no_bias_or_softcap(self) -> bool:
        """Fused log-probs take a plain ``h W^T``: a head bias or a logit soft-cap keeps the logits."""
        head = getattr(self.lm_head, 'base_layer', self.lm_head)
        if head.bias is None and not getattr(self.config, 'final_logit_softcapping', None):
            return True
        if not getattr(self, '_twinkle_warned_logps', False):
            logger.warning('fused log-probs skipped: lm_head has a bias or the model a final logit soft-cap; '
                           'logits are built')
            self._twinkle_warned_logps = True
        return False

    def _head_is_fusable(self, kwargs) -> bool:
        if not (type(self.lm_head) is nn.Linear or _is_plain_lora_linear(self.lm_head)):
            if not getattr(self, '_twinkle_warned_head', False):
                logger.warning('fused loss skipped: lm_head is %s, not nn.Linear; logits are built',
                               type(self.lm_head).__name__)
                self._twinkle_warned_head = True
            return False
        logits_to_keep = kwargs.get('logits_to_keep', 0)
        return isinstance(logits_to_keep, int) and logits_to_keep == 0


@functools.cache
def _with_logps(output_type: type) -> type:
    """``output_type`` with a ``logps`` field. A field, not an attribute: the output's pytree then holds
    the log-probs, so FSDP2's pre-backward hooks see them and gather lm_head's weight for their gradient."""
    return dataclasses.make_dataclass(f'{output_type.__name__}WithLogps',
                                      [('logps', Optional[torch.Tensor], dataclasses.field(default=None))],
                                      bases=(output_type,))


def _keep_last_hidden(decoder: nn.Module, inputs, output) -> None:
    capture = decoder.__dict__[CAPTURE]
    if capture['active']:  # other calls (eval, logits wanted) keep no activation alive
        capture['hidden'] = output[0] if isinstance(output, tuple) else output.last_hidden_state


def _is_plain_lora_linear(module: nn.Module) -> bool:
    """A peft LoRA layer over an ``nn.Linear``, without the variants that are not one linear map (DoRA,
    a LoRA bias, merged or disabled adapters are left to the stock path)."""
    base = getattr(module, 'base_layer', None)
    if type(base) is not nn.Linear or not hasattr(module, 'lora_A') or getattr(module, 'merged', False):
        return False
    if getattr(module, 'disable_adapters', False):
        return False
    active = [name for name in module.active_adapters if name in module.lora_A]
    return all(not module.use_dora.get(name, False) and module.lora_B[name].bias is None
               and type(module.lora_A[name]) is nn.Linear for name in active)


def _widened_head(head: nn.Module, hidden: torch.Tensor):
    """``(hidden, weight, bias)`` of one linear map equal to ``head`` (a Linear, or LoRA over a Linear)."""
    if type(head) is nn.Linear:
        return hidden, head.weight, head.bias
    base = head.base_layer
    inputs, weights = [hidden], [base.weight]
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        lora_a = head.lora_A[name]
        projected = F.linear(head.lora_dropout[name](hidden.to(lora_a.weight.dtype)), lora_a.weight)
        inputs.append((projected * head.scaling[name]).to(hidden.dtype))
        weights.append(head.lora_B[name].weight.to(base.weight.dtype))
    return torch.cat(inputs, dim=-1), torch.cat(weights, dim=1), base.bias
