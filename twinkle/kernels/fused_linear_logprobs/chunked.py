"""The chunked backend (any device) and the host loop and torch ops the triton backend shares.

The tokens go through FLCE's LM-head loop (``fused_linear_cross_entropy.chunked.head_chunks``): one
fp32 buffer of chunk x V logits, the only V-wide tensor, so memory never grows with N x V. With
``z = logits / temperature``:

- forward keeps per token only ``z[label] - logsumexp(z)`` (the log-prob), the entropy
  ``logsumexp(z) - sum(softmax(z) * z)`` when asked for, and the logsumexp itself (saved);
- backward recomputes each chunk's logits (a per-token upstream gradient must weight its row
  inside dW's sum over tokens, as for FLCE's reduction='none') and overwrites them with
  ``d/dz = g_lp * (onehot - p) + g_ent * p * (E[z] - z)``, ``E[z] = logsumexp - entropy``; the
  1 / temperature of ``dz/dlogits`` scales the small rows x H GEMM operands instead.

Ignored tokens are dropped before the loop: 0 log-prob and entropy, no gradient.

The ops (``define_ops``): ``<namespace>::fused_linear_logprobs_forward`` -> (logprobs, entropy or
an empty tensor, logsumexp), ``<namespace>::fused_linear_logprobs_backward`` -> (d_hidden, d_weight
fp32), joined by ``register_autograd``. A backend brings its per-chunk ``Steps``; this module's are
in-place PyTorch, registered as ``twinkle_chunked``.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch

from ..fused_linear_cross_entropy.chunked import chunk_rows, even_chunks, head_chunks, valid_rows

# forward(logits fp32 rows x V, labels, inv_temperature, want_entropy, scratch) -> (logprob, entropy or
# None, logsumexp), each (rows,) fp32, of z = logits * inv_temperature; it may overwrite ``logits``.
ForwardStep = Callable[[torch.Tensor, torch.Tensor, float, bool, Optional[torch.Tensor]],
                       Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]
# backward(logits, labels, inv_temperature, logsumexp, grad_logprob, grad_entropy, mean_logit, scratch)
# leaves d(sum(grad_logprob * logprob + grad_entropy * entropy)) / dz in ``logits``; grad_entropy and
# mean_logit (E[z] per row) are None when the entropy gets no gradient.
BackwardStep = Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                         Optional[torch.Tensor], Optional[torch.Tensor]], None]

# The chunk's V-wide fp32 buffers stay under this budget (the logits, and the scratch where the
# entropy is involved): at V=151936, 208 rows (96 with the entropy), so the op's memory is a
# constant beside dW at any token count, below FLCE's cpu budget (320 MiB: SFT's). Measured on this
# repo's 2-core host (N=1024, H=512, V=151936, fp32, 2 threads, log-probs fwd+bwd): 8.8 s at 48 rows
# a chunk, 7.5 s at 96, 6.5 s at 192, 6.0 s at 512, against 7.1 s for eager PyTorch: every chunk
# re-reads W for too little work below the knee of FLCE's cpu backend (256 rows per intra-op
# thread), which caps the rows at small vocabularies.
CHUNK_BUDGET_BYTES = 128 << 20
ROWS_PER_THREAD = 256


class Steps(NamedTuple):
    """A backend's per-chunk steps. With ``scratch``, they get a second fp32 buffer of the chunk's
    shape wherever the entropy is involved (None elsewhere); it is allocated once per call, as the
    logits' buffer is: a fresh V-wide tensor per chunk lets glibc's heap (its mmap threshold rises
    to the freed size) fragment, and the resident peak grew to several chunks."""
    forward: ForwardStep
    backward: BackwardStep
    scratch: bool


def torch_forward_step(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, want_entropy: bool,
                       scratch: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """In place on the chunk buffer; the entropy's exp(z - max) goes to the scratch, beside z - max."""
    if inv_temperature != 1.0:
        logits.mul_(inv_temperature)
    row_max = logits.amax(1, keepdim=True)
    shifted = logits.sub_(row_max)
    chosen = shifted.gather(1, labels.unsqueeze(1))
    entropy = None
    if want_entropy:
        exps = torch.exp(shifted, out=scratch)
        norm = exps.sum(1, keepdim=True)
        log_norm = norm.log()
        entropy = (log_norm - exps.mul_(shifted).sum(1, keepdim=True) / norm).squeeze(1)
    else:
        log_norm = shifted.exp_().sum(1, keepdim=True).log()
    return (chosen - log_norm).squeeze(1), entropy, (row_max + log_norm).squeeze(1)


def torch_backward_step(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, lse: torch.Tensor,
                        grad_logprob: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                        mean_logit: Optional[torch.Tensor], scratch: Optional[torch.Tensor]) -> None:
    """``-p * (g_lp + g_ent * (z - E[z])) + g_lp * onehot(label)`` in place (the entropy's term
    keeps p in the scratch)."""
    if inv_temperature != 1.0:
        logits.mul_(inv_temperature)
    lse, grad_logprob = lse.unsqueeze(1), grad_logprob.unsqueeze(1)
    if grad_entropy is None:
        grad = logits.sub_(lse).exp_().mul_(grad_logprob.neg())
    else:
        probs = torch.sub(logits, lse, out=scratch).exp_()
        grad = logits.sub_(mean_logit.unsqueeze(1)).mul_(grad_entropy.unsqueeze(1)).add_(grad_logprob)
        grad.mul_(probs).neg_()
    grad.scatter_add_(1, labels.unsqueeze(1), grad_logprob)


def max_rows() -> int:
    return ROWS_PER_THREAD * max(1, torch.get_num_threads())


_DEFINED: Dict[str, Callable] = {}


def define_ops(namespace: str, steps: Steps, rows_cap: Union[int, Callable[[], int]], budget_bytes: int) -> Callable:
    """Declare ``<namespace>::fused_linear_logprobs_forward`` / ``_backward`` over ``steps`` and
    return the backend function the registry calls (the public function's positional args after
    flattening): ``(hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size)
    -> (logprobs, entropy or empty)``. One definition per namespace."""
    if namespace in _DEFINED:
        return _DEFINED[namespace]

    def chunking(weight, count, chunk_size, entropy):
        """Rows per chunk, and the steps' scratch for chunks of that many rows (or None)."""
        scratch = entropy and steps.scratch
        rows = chunk_size or chunk_rows(weight, 1 + scratch, rows_cap, budget_bytes)
        if not scratch:
            return rows, None
        return rows, torch.empty(even_chunks(rows, count), weight.shape[0], dtype=torch.float32,
                                 device=weight.device)

    def rows_of(scratch, logits):
        return None if scratch is None else scratch[:logits.shape[0]]

    @torch.library.custom_op(f'{namespace}::fused_linear_logprobs_forward', mutates_args=())
    def forward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                   ignore_index: int, return_entropy: bool,
                   chunk_size: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprobs, entropy or an empty tensor, logsumexp of logits / temperature), fp32, 0 where ignored."""
        rows, count = valid_rows(labels, ignore_index)
        chunk_size, scratch = chunking(weight, count, chunk_size, return_entropy)
        logprobs = hidden.new_zeros(labels.shape, dtype=torch.float32)
        lse = torch.zeros_like(logprobs)
        entropy = torch.zeros_like(logprobs) if return_entropy else logprobs.new_empty(0)

        def visit(index, logits):
            chosen, spread, norm = steps.forward(logits, labels[index], 1.0 / temperature, return_entropy,
                                                 rows_of(scratch, logits))
            logprobs[index] = chosen
            lse[index] = norm
            if return_entropy:
                entropy[index] = spread

        head_chunks(hidden, weight, None, rows, chunk_size, visit)
        return logprobs, entropy, lse

    @forward_op.register_fake
    def _(hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size):
        logprobs = hidden.new_empty(labels.shape, dtype=torch.float32)
        return logprobs, logprobs.new_empty(labels.shape if return_entropy else (0,)), torch.empty_like(logprobs)

    @torch.library.custom_op(f'{namespace}::fused_linear_logprobs_backward', mutates_args=())
    def backward_op(grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    entropy: torch.Tensor, temperature: float, ignore_index: int, chunk_size: Optional[int],
                    hidden_grad: bool, weight_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(d_hidden, d_weight fp32) of ``sum(grad_logprobs * logprobs + grad_entropy * entropy)``
        (a None gradient counts as zeros), each an empty tensor unless asked for."""
        rows, count = valid_rows(labels, ignore_index)
        chunk_size, scratch = chunking(weight, count, chunk_size, grad_entropy is not None)
        inv_temperature = 1.0 / temperature
        # contiguous fp32 rows: an upstream gradient may be a broadcast (stride 0) view
        grad_logprobs = torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs.float().contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
            mean_logit = lse - entropy

        def visit(index, logits):
            steps.backward(logits, labels[index], inv_temperature, lse[index], grad_logprobs[index],
                           None if grad_entropy is None else grad_entropy[index],
                           None if grad_entropy is None else mean_logit[index], rows_of(scratch, logits))
            return torch.full((logits.shape[0], 1), inv_temperature, device=logits.device)

        d_hidden, d_weight, _ = head_chunks(hidden, weight, None, rows, chunk_size, visit,
                                            (hidden_grad, weight_grad, False))
        return (hidden.new_empty(0) if d_hidden is None else d_hidden,
                weight.new_empty(0, dtype=torch.float32) if d_weight is None else d_weight)

    @backward_op.register_fake
    def _(grad_logprobs, grad_entropy, hidden, weight, labels, lse, entropy, temperature, ignore_index, chunk_size,
          hidden_grad, weight_grad):
        return (hidden.new_empty(hidden.shape if hidden_grad else (0,)),
                weight.new_empty(weight.shape if weight_grad else (0,), dtype=torch.float32))

    def setup_context(ctx, inputs, output):
        hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size = inputs
        _, entropy, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not N zeros
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.options = (temperature, ignore_index, chunk_size)
        ctx.return_entropy = return_entropy
        ctx.dtypes = (hidden.dtype, weight.dtype)

    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        # the empty entropy (not asked for) has no gradient to pass on
        grads = backward_op(grad_logprobs, grad_entropy if ctx.return_entropy else None, hidden, weight, labels,
                            lse, entropy, *ctx.options, *wanted)
        found = tuple(grad.to(dtype) if want else None for grad, want, dtype in zip(grads, wanted, ctx.dtypes))
        return (*found, None, None, None, None, None)

    forward_op.register_autograd(backward, setup_context=setup_context)

    def fused_linear_logprobs(hidden, weight, labels, temperature, ignore_index, return_entropy, chunk_size):
        logprobs, entropy, _ = forward_op(hidden, weight, labels, temperature, ignore_index, return_entropy,
                                          chunk_size)
        return logprobs, entropy

    _DEFINED[namespace] = fused_linear_logprobs
    return fused_linear_logprobs


fused_linear_logprobs = define_ops('twinkle_chunked', Steps(torch_forward_step, torch_backward_step, scratch=True),
                                   max_rows, CHUNK_BUDGET_BYTES)
