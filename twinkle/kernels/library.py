"""Backends as torch ops: what makes every kernel one opaque, compile-clean node.

A fast backend declares its forward and backward as ``torch.library.custom_op``s with fake kernels
and joins them with ``register_autograd`` (``kernels/rms_norm/triton.py`` is the example):
torch.compile then sees one node per call in the forward graph and one in the backward graph (no
graph break, no tracing into Triton launches or host loops), AOTAutograd saves exactly what
``setup_context`` saves, and ``torch.library.opcheck`` tests schema, fake kernel and autograd
registration.

``reference_op`` does the same for a plain-PyTorch reference without writing its backward: a
second op, ``<name>_backward``, recomputes the reference under autograd and differentiates it
(the reference is the oracle and the last fallback, so readability wins over the second forward
it costs). Being an op, the backward is opaque to torch.compile as well, so a
reference whose shapes depend on values (a ``tolist()`` over group sizes) never reaches a graph.
"""
from __future__ import annotations

import inspect
import typing
from typing import Callable, List, Optional, Sequence

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


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _owned(results: Sequence[torch.Tensor], inputs: Sequence) -> List[torch.Tensor]:
    """``results`` contiguous from offset 0 (what the fake kernel promises) and sharing memory with
    no input and no other result (an op's outputs may not alias): autograd may hand an incoming
    gradient straight back (``.to(same dtype)`` is the identity), a view of it (the backward of a
    slice or a cat), or the same tensor twice."""
    owned: List[torch.Tensor] = []
    for result in results:
        shared = result._is_view() or any(result is other for other in (*inputs, *owned))
        if shared or not result.is_contiguous() or result.storage_offset():
            result = result.clone(memory_format=torch.contiguous_format)
        owned.append(result)
    return owned


def _autograd_inside_an_op():
    """A guard re-enabling autograd in an op's kernel, which the dispatcher runs below autograd
    (its keys excluded), so that the kernel can differentiate a recomputation eagerly.
    ``torch.func.vjp`` would need no guard but fails under any TorchDispatchMode (a FLOP counter,
    opcheck's schema check), whose tensors it cannot wrap."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def reference_op(name: str, fn: Callable, *, fake: Optional[Callable] = None):
    """``fn`` (annotated, tensors in, fresh tensors out) as the op ``twinkle_ref::<name>``.

    ``fake`` computes output metadata on fake tensors; by default ``fn`` itself, which works when
    its output shapes do not depend on tensor values. Gradients reach every floating tensor input
    autograd asks for (integer outputs get none), through the op ``twinkle_ref::<name>_backward``
    whose outputs are contiguous gradients shaped like those inputs."""
    tensors = _tensor_positions(fn)
    forward_schema = infer_schema(fn, mutates_args=())
    arguments = forward_schema[1:forward_schema.index(') ->')]

    forward_op = torch.library.custom_op(f'{NAMESPACE_REFERENCE}::{name}', fn, mutates_args=(),
                                         schema=forward_schema)
    forward_op.register_fake(fake or fn)

    def backward_impl(grad_outputs: List[Optional[torch.Tensor]], needs_grad: List[bool], *args):
        """The gradients w.r.t. the tensor inputs flagged in ``needs_grad`` of ``fn``'s outputs
        that have a ``grad_outputs`` entry (``None`` for integer outputs)."""
        full = list(args)
        leaves = []
        with _autograd_inside_an_op(), torch.enable_grad():
            for position, needed in zip(tensors, needs_grad):
                if needed:
                    full[position] = args[position].detach().requires_grad_()
                    leaves.append(full[position])
            pairs = [(out, grad) for out, grad in zip(_as_tuple(fn(*full)), grad_outputs)
                     if grad is not None and out.requires_grad]
            grads = torch.autograd.grad([out for out, _ in pairs], leaves, [grad for _, grad in pairs],
                                        allow_unused=True) if pairs else [None] * len(leaves)
        # an input the outputs do not depend on gets zeros, as autograd's materialised grads
        grads = [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]
        return _owned(grads, [*grad_outputs, *args])

    def backward_fake(grad_outputs, needs_grad, *args):
        return [torch.empty_like(args[p], memory_format=torch.contiguous_format)
                for p, needed in zip(tensors, needs_grad) if needed]

    backward_op = torch.library.custom_op(
        f'{NAMESPACE_REFERENCE}::{name}_backward', backward_impl, mutates_args=(),
        schema=f'(Tensor?[] grad_outputs, bool[] needs_grad, {arguments}) -> Tensor[]')
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[p] for p in tensors))
        ctx.others = [None if i in tensors else value for i, value in enumerate(inputs)]
        outputs = _as_tuple(output)
        ctx.floating_outputs = [out.is_floating_point() for out in outputs]
        ctx.mark_non_differentiable(*(out for out in outputs if not out.is_floating_point()))

    def backward(ctx, *grads):
        args = list(ctx.others)
        for position, saved in zip(tensors, ctx.saved_tensors):
            args[position] = saved
        needs = [bool(ctx.needs_input_grad[p]) and args[p] is not None and args[p].is_floating_point()
                 for p in tensors]
        result: List[Optional[torch.Tensor]] = [None] * len(args)
        if any(needs):
            grads = [grad if floating else None for grad, floating in zip(grads, ctx.floating_outputs)]
            found = iter(backward_op(grads, needs, *args))
            for position, needed in zip(tensors, needs):
                if needed:
                    result[position] = next(found)
        return tuple(result)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


__all__ = ['reference_op', 'NAMESPACE_REFERENCE']
