"""Backends as torch ops: what makes every kernel one opaque, compile-clean node.

A fast backend declares its forward and backward as ``torch.library.custom_op``s with fake kernels
and joins them with ``register_autograd`` (``kernels/rms_norm/triton.py`` is the example):
torch.compile then sees one node per call (no graph break, no tracing into Triton launches or host
loops), AOTAutograd saves exactly what ``setup_context`` saves, and ``torch.library.opcheck``
tests schema, fake kernel and autograd registration.

``reference_op`` does the same for a plain-PyTorch reference without writing its backward: the
backward recomputes the reference under autograd and differentiates it (the reference is the
oracle and the last fallback, so readability wins over the second forward it costs).
"""
from __future__ import annotations

import inspect
import typing
from typing import Callable, List, Optional

import torch
from torch._library.infer_schema import infer_schema

NAMESPACE_REFERENCE = 'twinkle_ref'


def _tensor_positions(fn: Callable) -> List[int]:
    """Positions of ``fn``'s Tensor / Optional[Tensor] parameters (its annotations say which)."""
    hints = typing.get_type_hints(fn)
    positions = []
    for index, name in enumerate(inspect.signature(fn).parameters):
        hint = hints.get(name)
        if hint is torch.Tensor or hint == Optional[torch.Tensor]:
            positions.append(index)
    return positions


def reference_op(name: str, fn: Callable, *, fake: Optional[Callable] = None):
    """``fn`` (annotated, tensors in, fresh tensors out) as the op ``twinkle_ref::<name>``.

    ``fake`` computes output metadata on fake tensors; by default ``fn`` itself, which works when
    its output shapes do not depend on tensor values. Gradients reach every floating tensor input
    autograd asks for (integer outputs get none)."""
    tensors = _tensor_positions(fn)
    forward_schema = infer_schema(fn, mutates_args=())
    arguments = forward_schema[1:forward_schema.index(') ->')]

    def forward(*args):
        with torch.no_grad():
            return fn(*args)

    forward_op = torch.library.custom_op(f'{NAMESPACE_REFERENCE}::{name}', forward, mutates_args=(),
                                         schema=forward_schema)
    forward_op.register_fake(fake or fn)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[p] for p in tensors))
        ctx.others = [None if i in tensors else value for i, value in enumerate(inputs)]
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*(out for out in outputs if not out.is_floating_point()))

    def backward(ctx, *grads):
        args = list(ctx.others)
        for position, saved in zip(tensors, ctx.saved_tensors):
            args[position] = saved
        needs = [bool(ctx.needs_input_grad[p]) and args[p] is not None and args[p].is_floating_point()
                 for p in tensors]
        leaves = []
        with torch.enable_grad():
            for position, needed in zip(tensors, needs):
                if needed:
                    args[position] = args[position].detach().requires_grad_()
                    leaves.append(args[position])
            outputs = fn(*args)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            pairs = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None and out.requires_grad]
            found = torch.autograd.grad([out for out, _ in pairs], leaves, [grad for _, grad in pairs],
                                        allow_unused=True) if pairs else [None] * len(leaves)
        found = iter(found)
        result: List[Optional[torch.Tensor]] = [None] * len(args)
        for position, needed in zip(tensors, needs):
            if needed:  # an input the outputs do not depend on gets zeros, as autograd's materialised grads
                grad = next(found)
                result[position] = torch.zeros_like(args[position]) if grad is None else grad
        return tuple(result)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


__all__ = ['reference_op', 'NAMESPACE_REFERENCE']
