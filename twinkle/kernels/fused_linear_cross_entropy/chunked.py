"""The chunked host path shared by the cpu, npu and triton backends.

Tokens go through ``chunk_size`` rows at a time: the chunk's logits ``h_c @ W.T (+ b)`` land in
one fp32 buffer of chunk_size x V, a *step* turns that buffer in place into the gradient of the
loss with respect to the logits (returning each row's loss), then ``dH_c = G @ W`` and
``dW += G.T @ h_c``. That buffer is the only V-wide tensor, so memory never grows with N x V.

Ignored tokens are dropped before the loop: they have neither loss nor gradient, so masked
prompt tokens cost nothing.

When are the gradients computed? For 'mean' and 'sum' during forward: three GEMMs per chunk, and
backward only scales them. Recomputing the logits in backward costs a fourth GEMM: measured on
this repo's CPU host (N=1024, H=512, V=151936, fp32, 1 thread) fwd+bwd takes 8.4 s of CPU that
way against 5.9 s. 'none' has no choice: each token's upstream gradient must weight its row
*inside* dW's sum over tokens, so its forward computes the loss only and backward recomputes.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

# step(logits fp32 rows x V, labels (rows,), want_grad, label_smoothing, softcap) -> fp32 loss per row;
# with want_grad it leaves d(loss_row)/d(logits) in ``logits`` (unscaled: the host scales the small
# rows x H operands of the gradient GEMMs instead of the rows x V buffer).
ChunkStep = Callable[[torch.Tensor, torch.Tensor, bool, float, Optional[float]], torch.Tensor]
Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def torch_chunk_step(logits: torch.Tensor, labels: torch.Tensor, want_grad: bool, label_smoothing: float,
                     softcap: Optional[float]) -> torch.Tensor:
    """Cross-entropy of each row, in place: every op overwrites the chunk buffer instead of
    allocating another V-wide tensor (a softcap needs one more, for tanh's derivative)."""
    vocab = logits.shape[1]
    labels = labels.unsqueeze(1)
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()
        logits = torch.mul(tanh, softcap)
    loss = (label_smoothing - 1.0) * logits.gather(1, labels)
    if label_smoothing:
        loss -= label_smoothing / vocab * logits.sum(1, keepdim=True)
    row_max = logits.amax(1, keepdim=True)
    exps = logits.sub_(row_max).exp_()
    norm = exps.sum(1, keepdim=True)
    loss += row_max + norm.log()
    if want_grad:
        grad = exps.div_(norm)  # softmax - (1 - smoothing) * one_hot(label) - smoothing / V
        grad.scatter_add_(1, labels, torch.full_like(norm, label_smoothing - 1.0))
        if label_smoothing:
            grad.sub_(label_smoothing / vocab)
        if tanh is not None:  # chain rule through softcap * tanh(x / softcap): 1 - tanh^2
            torch.addcmul(tanh.new_ones(()), tanh, tanh, value=-1.0, out=tanh).mul_(grad)
    return loss.squeeze(1)


def chunk_rows(n_rows: int, weight: torch.Tensor, softcap: Optional[float], max_rows: int,
               budget_bytes: int) -> int:
    """Rows per chunk: ``max_rows`` (where the per-chunk GEMMs reach full-GEMM speed) unless the
    chunk's V-wide buffers -- fp32 logits, the low-precision GEMM output when the weight is not
    fp32, a second fp32 buffer for the softcap -- would exceed ``budget_bytes``. Multiples of
    16 rows (whole GEMM register tiles)."""
    per_logit = 4 + (4 if softcap is not None else 0) + (0 if weight.dtype == torch.float32
                                                          else weight.element_size())
    rows = min(max_rows, max(1, budget_bytes // (weight.shape[0] * per_logit)))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(rows, n_rows))


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, staging: Optional[torch.Tensor]) -> None:
    """out (fp32) = a @ b. Low-precision operands multiply in their dtype (CPU BLAS has no
    fp32-output bf16 GEMM; it accumulates in fp32 inside), then widen into ``out``."""
    if staging is None:
        torch.mm(a, b, out=out)
    else:
        staged = staging[:out.shape[0]]
        torch.mm(a, b, out=staged)
        out.copy_(staged)


def chunked_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                 rows: Optional[torch.Tensor], *, step: ChunkStep, chunk_size: int, label_smoothing: float,
                 softcap: Optional[float], grad_scale: Union[None, float, torch.Tensor] = None,
                 wanted: Tuple[bool, bool, bool] = (False, False, False)) -> Tuple[torch.Tensor, Grads]:
    """Loss per token (fp32, 0 where ignored) and, when ``grad_scale`` (a number or one per
    token) is given, the ``wanted`` gradients of ``sum(grad_scale * loss)`` for (hidden, weight,
    bias); those of weight and bias stay fp32. ``rows`` lists the tokens to compute (None: all)."""
    count = hidden.shape[0] if rows is None else rows.numel()
    want_hidden, want_weight, want_bias = wanted if grad_scale is not None else (False, False, False)
    loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros_like(hidden) if want_hidden else None
    # dW's first chunk is written, not added: no 4 x V x H bytes of zeros to lay down first
    d_weight = (torch.empty if count else torch.zeros)(weight.shape, dtype=torch.float32,
                                                       device=weight.device) if want_weight else None
    d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
    chunk_size = max(1, min(chunk_size, count))
    buffer = torch.empty(chunk_size, weight.shape[0], dtype=torch.float32, device=hidden.device)
    staging = None if weight.dtype == torch.float32 else torch.empty_like(buffer, dtype=weight.dtype)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        index = slice(start, stop) if rows is None else rows[start:stop]
        chunk_hidden = hidden[index]
        logits = buffer[:stop - start]
        _mm_into(logits, chunk_hidden, weight.t(), staging)
        if bias is not None:
            logits.add_(bias)
        loss[index] = step(logits, labels[index], want_hidden or want_weight or want_bias, label_smoothing, softcap)
        if grad_scale is None:
            continue
        scale = (grad_scale[index].float().unsqueeze(1) if isinstance(grad_scale, torch.Tensor)
                 else torch.full((stop - start, 1), grad_scale, device=hidden.device))
        if want_hidden:
            grad_logits = logits if staging is None else staging[:stop - start].copy_(logits)
            d_hidden[index] = (grad_logits @ weight).mul_(scale)
        if want_weight:
            scaled_hidden = chunk_hidden.float() * scale
            if start == 0:
                torch.mm(logits.t(), scaled_hidden, out=d_weight)
            else:
                d_weight.addmm_(logits.t(), scaled_hidden)
        if want_bias:
            d_bias.addmv_(logits.t(), scale.squeeze(1))
    return loss, (d_hidden, d_weight, d_bias)


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> Tuple[Optional[torch.Tensor], int]:
    """Indices of the tokens that count (None when all do: chunks are then plain slices)."""
    valid = labels != ignore_index
    count = int(valid.sum())
    if count == labels.numel():
        return None, count
    return valid.nonzero().squeeze(1), count


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, softcap, chunk_size,
                step, track_grads):
        rows, count = _valid_rows(labels, ignore_index)
        ctx.reduction = reduction
        ctx.options = dict(step=step, chunk_size=chunk_size, label_smoothing=label_smoothing, softcap=softcap)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        wanted = tuple(track_grads and need for need in ctx.needs_input_grad[:3])
        if reduction == 'none':
            loss, _ = chunked_pass(hidden, weight, bias, labels, rows, **ctx.options)
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.rows, ctx.wanted = rows, wanted
            return loss
        scale = 1.0 / max(count, 1) if reduction == 'mean' else 1.0
        loss, ctx.grads = chunked_pass(hidden, weight, bias, labels, rows, grad_scale=scale, wanted=wanted,
                                       **ctx.options)
        return loss.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == 'none':
            hidden, weight, bias, labels = ctx.saved_tensors
            _, (d_hidden, d_weight, d_bias) = chunked_pass(hidden, weight, bias, labels, ctx.rows,
                                                           grad_scale=grad_loss, wanted=ctx.wanted, **ctx.options)
        else:
            if ctx.grads is None:
                raise RuntimeError('fused_linear_cross_entropy computes its gradients during forward and hands '
                                   'them over once: backward through it cannot run twice (retain_graph)')
            (d_hidden, d_weight, d_bias), ctx.grads = ctx.grads, None  # autograd can take them without a copy
            if not bool(grad_loss == 1.0):
                for grad in (d_hidden, d_weight, d_bias):
                    if grad is not None:
                        grad.mul_(grad_loss)
        d_weight = None if d_weight is None else d_weight.to(ctx.dtypes[0])
        d_bias = None if d_bias is None else d_bias.to(ctx.dtypes[1])
        return (d_hidden, d_weight, d_bias) + (None,) * 8


def chunked_op(step: ChunkStep, max_rows: int, budget_bytes: int) -> Callable:
    """The op function of a backend built on this loop: its per-chunk ``step`` and chunk sizing."""
    def fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
                                   chunk_size):
        chunk_size = chunk_size or chunk_rows(hidden.shape[0], weight, softcap, max_rows, budget_bytes)
        return ChunkedLinearCrossEntropyFunction.apply(hidden, weight, bias, labels, ignore_index, reduction,
                                                       label_smoothing, softcap, chunk_size, step,
                                                       torch.is_grad_enabled())
    return fused_linear_cross_entropy
