"""The chunked host path shared by the cpu, npu and triton backends, and the torch ops every
backend of this op is declared as.

Tokens go through ``chunk_size`` rows at a time: the chunk's logits ``h_c @ W.T (+ b)`` land in
one fp32 buffer of chunk_size x V, a *step* turns that buffer in place into the gradient of the
loss with respect to the logits (returning each row's loss), then ``dH_c = G @ W`` and
``dW += G.T @ h_c``. That buffer is the only V-wide tensor, so memory never grows with N x V.
The loop itself (``head_chunks``) knows nothing of cross-entropy: ``fused_linear_logprobs`` runs
its own steps through it.

Ignored tokens are dropped before the loop: they have neither loss nor gradient, so masked
prompt tokens cost nothing.

When are the gradients computed? For 'mean' and 'sum' during forward: three GEMMs per chunk, and
backward only scales them. Recomputing the logits in backward costs a fourth GEMM: measured on
this repo's CPU host (N=1024, H=512, V=151936, fp32, 1 thread) fwd+bwd takes 8.4 s of CPU that
way against 5.9 s. 'none' has no choice: each token's upstream gradient must weight its row
*inside* dW's sum over tokens, so its forward computes the loss only and backward recomputes.

The ops (``define_ops``): ``<namespace>::fused_linear_cross_entropy_forward`` returns the loss and,
for 'mean'/'sum', the gradients of the loss as more outputs, which ``setup_context`` saves and the
autograd formula scales by the upstream gradient (a tensor: no host sync). Which gradients to
compute is three bools of the schema, read from ``requires_grad`` and the grad mode by the caller;
a gradient not asked for is an empty output. 'none' goes through ``<namespace>::
fused_linear_cross_entropy_backward``, the loop again with a weight per token.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch._subclasses.fake_tensor import is_fake

REDUCTIONS = ('mean', 'sum', 'none')
# step(logits fp32 rows x V, labels (rows,), want_grad, label_smoothing, softcap) -> fp32 loss per row;
# with want_grad it leaves d(loss_row)/d(logits) in ``logits`` (unscaled: the host scales the small
# rows x H operands of the gradient GEMMs instead of the rows x V buffer).
ChunkStep = Callable[[torch.Tensor, torch.Tensor, bool, float, Optional[float]], torch.Tensor]
Grads = Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]
Wanted = Tuple[bool, bool, bool]


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


def chunk_rows(weight: torch.Tensor, fp32_buffers: int, max_rows: Union[int, Callable[[], int]],
               budget_bytes: int) -> int:
    """Rows per chunk: ``max_rows`` (where the per-chunk GEMMs reach full-GEMM speed) unless the
    chunk's V-wide buffers -- ``fp32_buffers`` fp32 ones (the logits, one more for a softcap's
    tanh), the low-precision GEMM output when the weight is not fp32 -- would exceed
    ``budget_bytes``. Multiples of 16 rows (whole GEMM register tiles); ``head_chunks`` evens it
    out over the tokens there are. ``max_rows`` may be a function, read at each call (the CPU
    knee moves with the thread count)."""
    max_rows = max_rows() if callable(max_rows) else max_rows
    per_logit = 4 * fp32_buffers + (0 if weight.dtype == torch.float32 else weight.element_size())
    rows = min(max_rows, max(1, budget_bytes // (max(weight.shape[0], 1) * per_logit)))
    if rows > 16:
        rows -= rows % 16
    return rows


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, staging: Optional[torch.Tensor]) -> None:
    """out (fp32) = a @ b. Low-precision operands multiply in their dtype (CPU BLAS has no
    fp32-output bf16 GEMM; it accumulates in fp32 inside), then widen into ``out``."""
    if staging is None:
        torch.mm(a, b, out=out)
    else:
        staged = staging[:out.shape[0]]
        torch.mm(a, b, out=staged)
        out.copy_(staged)


def even_chunks(chunk_size: int, count: int) -> int:
    """The same number of chunks, of equal rows: 960 tokens at 512 rows run as 2 x 480, not 512 +
    448 -- no short last chunk whose GEMMs run below full speed."""
    chunks = max(1, -(-count // max(chunk_size, 1)))
    return max(1, -(-count // chunks))


Index = Union[slice, torch.Tensor]
# visit(index, logits fp32 rows x V) -> the (rows, 1) scale of the gradient it left in ``logits`` when
# gradients are wanted (None otherwise): the host scales the small rows x H GEMM operands, not the buffer.
ChunkVisit = Callable[[Index, torch.Tensor], Optional[torch.Tensor]]


def head_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                rows: Optional[torch.Tensor], chunk_size: int, visit: ChunkVisit,
                wanted: Wanted = (False, False, False)) -> Grads:
    """The loop of every op on an LM head (this one, ``fused_linear_logprobs``): the ``rows`` of
    hidden (None: all) go ``chunk_size`` at a time through one fp32 buffer holding the chunk's
    logits ``h_c @ W.T (+ b)``, which ``visit`` reads (and, when gradients are wanted, overwrites
    with the gradient of the chunk's result w.r.t. those logits). Returns the ``wanted``
    gradients (hidden, weight, bias) of everything the visits left, scaled by the scale each
    returned; those of weight and bias are fp32, None where not wanted."""
    count = hidden.shape[0] if rows is None else rows.numel()
    want_hidden, want_weight, want_bias = wanted
    d_hidden = torch.zeros_like(hidden) if want_hidden else None
    # dW's first chunk is written, not added: no 4 x V x H bytes of zeros to lay down first
    d_weight = (torch.empty if count else torch.zeros)(weight.shape, dtype=torch.float32,
                                                       device=weight.device) if want_weight else None
    d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_bias else None
    chunk_size = even_chunks(chunk_size, count)
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
        scale = visit(index, logits)
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
    return d_hidden, d_weight, d_bias


def chunked_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                 rows: Optional[torch.Tensor], *, step: ChunkStep, chunk_size: int, label_smoothing: float,
                 softcap: Optional[float], grad_scale: Union[None, float, torch.Tensor] = None,
                 wanted: Wanted = (False, False, False)) -> Tuple[torch.Tensor, Grads]:
    """Loss per token (fp32, 0 where ignored) and, when ``grad_scale`` (a number or one per
    token) is given, the ``wanted`` gradients of ``sum(grad_scale * loss)`` for (hidden, weight,
    bias); those of weight and bias stay fp32. ``rows`` lists the tokens to compute (None: all)."""
    wanted = wanted if grad_scale is not None else (False, False, False)
    want_grad = any(wanted)
    loss = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)

    def visit(index, logits):
        loss[index] = step(logits, labels[index], want_grad, label_smoothing, softcap)
        if grad_scale is None:
            return None
        return (grad_scale[index].float().unsqueeze(1) if isinstance(grad_scale, torch.Tensor)
                else torch.full((logits.shape[0], 1), grad_scale, device=hidden.device))

    return loss, head_chunks(hidden, weight, bias, rows, chunk_size, visit, wanted)


def valid_rows(labels: torch.Tensor, ignore_index: int) -> Tuple[Optional[torch.Tensor], int]:
    """Indices of the tokens that count (None when all do: chunks are then plain slices). The
    count is read to the host: it sizes the loop (once per call, inside the op)."""
    valid = labels != ignore_index
    count = int(valid.sum())
    if count == labels.numel():
        return None, count
    return valid.nonzero().squeeze(1), count


class Passes(NamedTuple):
    """What a backend brings to ``define_ops``: host functions over plain tensors and numbers.

    ``forward(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
    chunk_size, wanted) -> (loss, grads)``: the loss and, for 'mean'/'sum', the ``wanted``
    gradients (hidden, weight, bias) of that loss, None where not wanted.
    ``unreduced_backward(grad_loss, hidden, weight, labels, bias, ignore_index, label_smoothing,
    softcap, chunk_size, wanted) -> grads``: the gradients of ``sum(grad_loss * loss)`` for 'none'."""
    forward: Callable[..., Tuple[torch.Tensor, Grads]]
    unreduced_backward: Callable[..., Grads]


def chunked_passes(step: ChunkStep, max_rows: Union[int, Callable[[], int]], budget_bytes: int) -> Passes:
    """The passes of a backend built on this loop: its per-chunk ``step`` and chunk sizing."""
    def options(weight, label_smoothing, softcap, chunk_size):
        buffers = 1 if softcap is None else 2  # the logits, and tanh's for a softcap
        return dict(step=step, chunk_size=chunk_size or chunk_rows(weight, buffers, max_rows, budget_bytes),
                    label_smoothing=label_smoothing, softcap=softcap)

    def forward(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size, wanted):
        rows, count = valid_rows(labels, ignore_index)
        settings = options(weight, label_smoothing, softcap, chunk_size)
        if reduction == 'none':
            loss, _ = chunked_pass(hidden, weight, bias, labels, rows, **settings)
            return loss, (None, None, None)
        scale = 1.0 / max(count, 1) if reduction == 'mean' else 1.0
        losses, grads = chunked_pass(hidden, weight, bias, labels, rows, grad_scale=scale, wanted=wanted, **settings)
        return losses.sum() * scale, grads

    def unreduced_backward(grad_loss, hidden, weight, labels, bias, ignore_index, label_smoothing, softcap,
                           chunk_size, wanted):
        rows, _ = valid_rows(labels, ignore_index)
        _, grads = chunked_pass(hidden, weight, bias, labels, rows, grad_scale=grad_loss, wanted=wanted,
                                **options(weight, label_smoothing, softcap, chunk_size))
        return grads

    return Passes(forward, unreduced_backward)


def _gradient_outputs(hidden: torch.Tensor, weight: torch.Tensor, grads: Grads) -> Tuple[torch.Tensor, ...]:
    """The op's gradient outputs: each computed gradient (dW and db fp32), or an empty tensor."""
    empties = (hidden.new_empty(0), weight.new_empty(0, dtype=torch.float32),
               weight.new_empty(0, dtype=torch.float32))
    return tuple(empty if grad is None else grad for grad, empty in zip(grads, empties))


def _gradient_fakes(hidden: torch.Tensor, weight: torch.Tensor, wanted: Wanted) -> Tuple[torch.Tensor, ...]:
    want_hidden, want_weight, want_bias = wanted
    return (hidden.new_empty(hidden.shape if want_hidden else (0,)),
            weight.new_empty(weight.shape if want_weight else (0,), dtype=torch.float32),
            weight.new_empty(weight.shape[:1] if want_bias else (0,), dtype=torch.float32))


def _wanted(bias: Optional[torch.Tensor], hidden_grad: bool, weight_grad: bool, bias_grad: bool) -> Wanted:
    return hidden_grad, weight_grad, bias_grad and bias is not None


TWICE = ('fused_linear_cross_entropy: its gradients are computed during forward and scaled in place by the '
         'first backward, so backward through it cannot run twice (retain_graph); use reduction="none" '
         'and sum, which recomputes in backward')


def _saved_gradients(ctx) -> Tuple[torch.Tensor, ...]:
    """The gradients saved by forward, refused once a backward has scaled them in place (autograd's
    version counter of saved tensors sees that mutation)."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if 'modified by an inplace operation' in str(error):
            raise RuntimeError(TWICE) from error
        raise


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad * grad_loss``: in place where autograd runs eagerly (no second V x H buffer, and the
    version counter then refuses a second backward); out of place while traced, where
    functionalization would rewrite the mutation anyway and AOTAutograd cannot partition a
    backward that mutates a forward output (a second compiled backward is then simply right)."""
    return grad * grad_loss if is_fake(grad) else grad.mul_(grad_loss)


_DEFINED: Dict[str, Callable] = {}


def define_ops(namespace: str, passes: Passes) -> Callable:
    """Declare ``<namespace>::fused_linear_cross_entropy_forward`` / ``_backward`` over ``passes``
    and return the backend function the registry calls (the public function's positional args).
    One definition per namespace: a backend module imported again gets the ops of the first."""
    if namespace in _DEFINED:
        return _DEFINED[namespace]

    @torch.library.custom_op(f'{namespace}::fused_linear_cross_entropy_forward', mutates_args=())
    def forward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
                   ignore_index: int, reduction: str, label_smoothing: float, softcap: Optional[float],
                   chunk_size: Optional[int], hidden_grad: bool, weight_grad: bool,
                   bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss fp32, d_hidden, d_weight fp32, d_bias fp32); the gradients are empty unless
        asked for and the reduction is 'mean' or 'sum'."""
        loss, grads = passes.forward(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing,
                                     softcap, chunk_size, _wanted(bias, hidden_grad, weight_grad, bias_grad))
        return (loss, *_gradient_outputs(hidden, weight, grads))

    @forward_op.register_fake
    def _(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size,
          hidden_grad, weight_grad, bias_grad):
        loss = hidden.new_empty(labels.shape if reduction == 'none' else (), dtype=torch.float32)
        in_forward = reduction != 'none'
        wanted = _wanted(bias, hidden_grad, weight_grad, bias_grad)
        return (loss, *_gradient_fakes(hidden, weight, tuple(in_forward and want for want in wanted)))

    @torch.library.custom_op(f'{namespace}::fused_linear_cross_entropy_backward', mutates_args=())
    def backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    bias: Optional[torch.Tensor], ignore_index: int, label_smoothing: float,
                    softcap: Optional[float], chunk_size: Optional[int], hidden_grad: bool, weight_grad: bool,
                    bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """reduction='none': (d_hidden, d_weight fp32, d_bias fp32) of ``sum(grad_loss * loss)``."""
        grads = passes.unreduced_backward(grad_loss, hidden, weight, labels, bias, ignore_index, label_smoothing,
                                          softcap, chunk_size, _wanted(bias, hidden_grad, weight_grad, bias_grad))
        return _gradient_outputs(hidden, weight, grads)

    @backward_op.register_fake
    def _(grad_loss, hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, chunk_size,
          hidden_grad, weight_grad, bias_grad):
        return _gradient_fakes(hidden, weight, _wanted(bias, hidden_grad, weight_grad, bias_grad))

    def setup_context(ctx, inputs, output):
        hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size = inputs[:9]
        _, *grads = output
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)  # else autograd lays down V x H zeros for dW's unused gradient
        ctx.wanted = _wanted(bias, *inputs[9:])
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.unreduced = reduction == 'none'
        if ctx.unreduced:
            ctx.save_for_backward(hidden, weight, labels, bias)
            ctx.options = (ignore_index, label_smoothing, softcap, chunk_size, *inputs[9:])
        else:
            ctx.save_for_backward(*grads)

    def backward(ctx, grad_loss, *_grad_of_gradients):
        if ctx.unreduced:
            hidden, weight, labels, bias = ctx.saved_tensors
            grads = backward_op(grad_loss, hidden, weight, labels, bias, *ctx.options)
        else:
            grads = tuple(_scaled(grad, grad_loss) if wanted else grad
                          for grad, wanted in zip(_saved_gradients(ctx), ctx.wanted))
        found = tuple(grad.to(dtype) if wanted else None for grad, wanted, dtype in zip(grads, ctx.wanted, ctx.dtypes))
        return found[0], found[1], None, found[2], *(None,) * 8

    forward_op.register_autograd(backward, setup_context=setup_context)

    def fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
                                   chunk_size):
        grad_mode = torch.is_grad_enabled()
        wanted = [grad_mode and tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias)]
        return forward_op(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
                          chunk_size, *wanted)[0]

    _DEFINED[namespace] = fused_linear_cross_entropy
    return fused_linear_cross_entropy
