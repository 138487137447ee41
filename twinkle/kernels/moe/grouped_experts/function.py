"""The grouped SwiGLU experts as torch ops, declared once for every fast backend; each backend only
supplies its grouped GEMM (a ``GroupedGemm``: BLAS per expert, ``torch._grouped_mm``, Triton,
``npu_grouped_matmul``) and a namespace (``twinkle_cpu``, ``twinkle_triton``, ...).

Autograd sees three nodes, so that it frees each one's saved tensors and incoming gradient as soon
as that node's backward is done (one op for everything would hold the expert output's gradient
until the end, 128 MiB more at the benchmark shape):
- ``<namespace>::grouped_gate_up_forward``: x -> (gate, up), per group, into two contiguous
  (rows, I) buffers; saves x. Backward (``grouped_gate_up_backward``): dW_gate_up = [dgate; dup]^T x,
  dx = dgate W_gate + dup W_up (no concatenation).
- ``swiglu(gate, up)``: twinkle's op (fused where the device has a kernel), ``inplace`` when
  autograd runs: its backward writes the gradients over gate and up, which nothing else reads.
- ``<namespace>::grouped_down_forward``: h -> h W_down^T per group; saves h. Backward
  (``grouped_down_backward``): dh = dy W_down, dW_down = dy^T h.

Every op takes tensors and flags only and derives its groups from ``tokens_per_expert`` itself, so
no Python object rides through autograd and torch.compile sees one opaque node per op. A backward
op computes only the gradients its flags ask for and returns an empty tensor for the others.
"""
from typing import Any, Optional, Protocol, Tuple

import torch

from ...swiglu import overwrite_refusal, swiglu


class GroupedGemm(Protocol):
    """Matrix products over row groups: group e is the ``tokens_per_expert[e]`` rows after those
    of the groups before it. ``out`` may be given (written, or added to with ``accumulate``)."""

    def groups(self, tokens_per_expert: torch.Tensor, rows: int) -> Any:
        """What ``rows`` and ``per_group`` need to find the groups of ``rows`` rows (offsets, spans, ...)."""

    def rows(self, a: torch.Tensor, b: torch.Tensor, groups: Any, out: Optional[torch.Tensor] = None,
             accumulate: bool = False) -> torch.Tensor:
        """(rows, K) x (E, K, N) -> (rows, N): each group's rows times its expert's matrix."""

    def per_group(self, a: torch.Tensor, b: torch.Tensor, groups: Any,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(rows, M) x (rows, N) -> (E, M, N): a_e^T b_e per group (zeros for an empty group)."""


def into(result: torch.Tensor, out: Optional[torch.Tensor], accumulate: bool = False) -> torch.Tensor:
    """For GEMMs that return fresh tensors: ``result`` itself, or written / added into ``out``."""
    if out is None:
        return result
    return out.add_(result) if accumulate else out.copy_(result)


def _gradient_like(tensor: torch.Tensor, wanted: bool) -> torch.Tensor:
    """The buffer of a gradient a backward op computes, or the empty tensor standing for one it skips."""
    return tensor.new_empty(tensor.shape if wanted else (0,))


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd_by(backward_op):
    """The autograd backward of a forward op ``(x, weight, tokens_per_expert)`` whose gradients are
    ``backward_op(*output grads, x, weight, tokens_per_expert, input_grad, weight_grad)``."""
    def backward(ctx, *grads):
        x, weight, tokens_per_expert = ctx.saved_tensors
        input_grad, weight_grad = ctx.needs_input_grad[:2]
        grad_x, grad_weight = backward_op(*grads, x, weight, tokens_per_expert, input_grad, weight_grad)
        return grad_x if input_grad else None, grad_weight if weight_grad else None, None
    return backward


def define_grouped_experts(namespace: str, gemm: GroupedGemm):
    """The op function ``grouped_experts(permuted, tokens_per_expert, gate_up_proj, down_proj)`` of the
    backend whose grouped GEMM is ``gemm``, its four ops registered under ``namespace``."""

    @torch.library.custom_op(f'{namespace}::grouped_gate_up_forward', mutates_args=())
    def gate_up_forward(permuted: torch.Tensor, gate_up_proj: torch.Tensor,
                        tokens_per_expert: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        groups = gemm.groups(tokens_per_expert, permuted.shape[0])
        gate_proj, up_proj = gate_up_proj.chunk(2, dim=1)
        return (gemm.rows(permuted, gate_proj.transpose(1, 2), groups),
                gemm.rows(permuted, up_proj.transpose(1, 2), groups))

    @gate_up_forward.register_fake
    def _(permuted, gate_up_proj, tokens_per_expert):
        shape = (permuted.shape[0], gate_up_proj.shape[1] // 2)
        return permuted.new_empty(shape), permuted.new_empty(shape)

    @torch.library.custom_op(f'{namespace}::grouped_gate_up_backward', mutates_args=())
    def gate_up_backward(grad_gate: torch.Tensor, grad_up: torch.Tensor, permuted: torch.Tensor,
                         gate_up_proj: torch.Tensor, tokens_per_expert: torch.Tensor, input_grad: bool,
                         weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        groups = gemm.groups(tokens_per_expert, permuted.shape[0])
        grad_gate, grad_up = grad_gate.contiguous(), grad_up.contiguous()
        grad_input, grad_gate_up = _gradient_like(permuted, input_grad), _gradient_like(gate_up_proj, weight_grad)
        if weight_grad:
            intermediate = grad_gate.shape[1]
            gemm.per_group(grad_gate, permuted, groups, out=grad_gate_up[:, :intermediate])
            gemm.per_group(grad_up, permuted, groups, out=grad_gate_up[:, intermediate:])
        if input_grad:
            gate_proj, up_proj = gate_up_proj.chunk(2, dim=1)
            gemm.rows(grad_gate, gate_proj, groups, out=grad_input)
            gemm.rows(grad_up, up_proj, groups, out=grad_input, accumulate=True)
        return grad_input, grad_gate_up

    @gate_up_backward.register_fake
    def _(grad_gate, grad_up, permuted, gate_up_proj, tokens_per_expert, input_grad, weight_grad):
        return _gradient_like(permuted, input_grad), _gradient_like(gate_up_proj, weight_grad)

    gate_up_forward.register_autograd(_autograd_by(gate_up_backward), setup_context=_save_inputs)

    @torch.library.custom_op(f'{namespace}::grouped_down_forward', mutates_args=())
    def down_forward(hidden: torch.Tensor, down_proj: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return gemm.rows(hidden, down_proj.transpose(1, 2), gemm.groups(tokens_per_expert, hidden.shape[0]))

    @down_forward.register_fake
    def _(hidden, down_proj, tokens_per_expert):
        return hidden.new_empty(hidden.shape[0], down_proj.shape[1])

    @torch.library.custom_op(f'{namespace}::grouped_down_backward', mutates_args=())
    def down_backward(grad_out: torch.Tensor, hidden: torch.Tensor, down_proj: torch.Tensor,
                      tokens_per_expert: torch.Tensor, input_grad: bool,
                      weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        groups = gemm.groups(tokens_per_expert, hidden.shape[0])
        grad_out = grad_out.contiguous()
        grad_hidden = gemm.rows(grad_out, down_proj, groups) if input_grad else _gradient_like(hidden, False)
        grad_down = gemm.per_group(grad_out, hidden, groups) if weight_grad else _gradient_like(down_proj, False)
        return grad_hidden, grad_down

    @down_backward.register_fake
    def _(grad_out, hidden, down_proj, tokens_per_expert, input_grad, weight_grad):
        return _gradient_like(hidden, input_grad), _gradient_like(down_proj, weight_grad)

    down_forward.register_autograd(_autograd_by(down_backward), setup_context=_save_inputs)

    def grouped_experts(permuted, tokens_per_expert, gate_up_proj, down_proj):
        gate, up = gate_up_forward(permuted, gate_up_proj, tokens_per_expert)
        # Nothing but swiglu reads gate and up: its backward may write their gradients over them.
        inplace = torch.is_grad_enabled() and overwrite_refusal(gate) is None and overwrite_refusal(up) is None
        return down_forward(swiglu(gate, up, inplace=inplace), down_proj, tokens_per_expert)
    return grouped_experts
